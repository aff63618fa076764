"""Ember's tokenizers and `to-hf` exports load in transformers 4.x as they do in transformers 5.

transformers 4.x runs in its own small venv (`.venv-transformers4` in the repository, made on first use and
reused while its pins stay the same) that shares this environment's torch, so Ember's own environment
keeps transformers 5 and the check costs one `pip install` of transformers 4.x and its small dependencies.
"""

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from packaging.requirements import Requirement
from test_convert import randomize
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_prep.tokenizer import encode_documents, tokenizer_fingerprint
from modeling import EmberConfig, EmberForCausalLM, EmberForMaskedLM
from modeling.convert import to_hf
from modeling.tokenizer_config import make_portable

REPO_ROOT = Path(__file__).resolve().parents[1]
# The last transformers 4.x release, and the tokenizers / huggingface_hub it accepts (it caps both below
# the versions transformers 5 needs). Everything else comes from constraints.txt.
TRANSFORMERS4 = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2")
TRANSFORMERS4_VENV = REPO_ROOT / ".venv-transformers4"

# What a deployment client sees of a tokenizer (and, given ids, of the model), as JSON. The same source runs
# in transformers 4.x (a subprocess in the venv) and in this process's transformers 5.
CLIENT = r"""
import json, sys
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast


def probe(directory, texts):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?\n"},
                {"role": "assistant", "content": " 4"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return {
        "fast": isinstance(tokenizer, PreTrainedTokenizerFast),
        "len": len(tokenizer),
        "specials": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token],
        "all_special": sorted(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens)),
        "max_length": tokenizer.model_max_length,
        "ids": [tokenizer(text)["input_ids"] for text in texts],
        "ids_no_specials": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts],
        "split_specials": [tokenizer(text, split_special_tokens=True)["input_ids"] for text in texts],
        "decoded": [tokenizer.decode(tokenizer(text)["input_ids"]) for text in texts],
        "chat": tokenizer.apply_chat_template(messages, tokenize=False),
        "prompt": tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True),
        "chat_ids": [int(i) for i in chat["input_ids"]],
        "assistant_mask": [int(m) for m in chat["assistant_masks"]],
    }


if __name__ == "__main__":
    directory, texts, ids, logits_file = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    result = {"transformers": transformers.__version__, "tokenizer": probe(directory, texts)}
    if ids:
        masked = AutoConfig.from_pretrained(directory).architectures[0].endswith("ForMaskedLM")
        model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(directory).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor(ids)).logits, logits_file)
        result["class"] = type(model).__name__
    print(json.dumps(result))
"""
TEXTS = ["def f(x):\n\treturn x  # 42\r\n", "  spaces   and\ttabs\n\n", "emoji 👩\u200d💻 日本語 עברית 12345",
         "<|im_start|>user<|endoftext|> literal specials", ""]


def probe(directory: Path) -> dict:
    """`probe` of CLIENT, run here in transformers 5."""
    namespace: dict = {}
    exec(CLIENT, namespace)
    return json.loads(json.dumps(namespace["probe"](str(directory), TEXTS)))  # tuples -> lists, as from JSON


def run_transformers4(python: Path, directory: Path, ids: list | None = None, logits_file: Path | None = None) -> dict:
    """CLIENT in the transformers 4.x venv."""
    result = subprocess.run([str(python), "-c", CLIENT, str(directory), json.dumps(TEXTS), json.dumps(ids or []),
                             str(logits_file or "")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["transformers"] == TRANSFORMERS4[0].split("==")[1]
    return output


def _torch_requirements() -> list[str]:
    """torch's own dependencies (installed in the venv; torch itself is shared from this environment)."""
    requirements = [Requirement(text) for text in importlib.metadata.requires("torch") or []]
    return [req.name + str(req.specifier) for req in requirements if req.marker is None or req.marker.evaluate()]


@pytest.fixture(scope="session")
def transformers4_python() -> Path:
    """The Python of a venv with transformers 4.x and this environment's torch; made once, reused after."""
    torch_dist = importlib.metadata.distribution("torch")
    site = Path(torch_dist.locate_file(""))
    # torch's top-level packages (torch, torchgen, functorch): top_level.txt where the wheel has one (not 2.14's)
    top_level = (torch_dist.read_text("top_level.txt") or "").split() or sorted(
        {file.parts[0] for file in torch_dist.files or () if len(file.parts) == 2 and file.name == "__init__.py"})
    shared = [site / name for name in top_level]
    shared += list(site.glob(f"torch-{torch_dist.version}.dist-info"))
    pins = [line for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
            if line.split("==")[0].lower().replace("_", "-") not in {"transformers", "tokenizers", "huggingface-hub"}]
    pins += TRANSFORMERS4
    packages = [TRANSFORMERS4[0], *_torch_requirements()]
    wanted = hashlib.sha256(json.dumps([pins, packages, [str(p) for p in shared]]).encode()).hexdigest()
    venv, python = TRANSFORMERS4_VENV, TRANSFORMERS4_VENV / "bin" / "python"
    stamp = venv / ".installed"
    with FileLock(str(venv) + ".lock"):
        if stamp.is_file() and stamp.read_text() == wanted:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
        (venv / "constraints.txt").write_text("\n".join(pins) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                        "-c", str(venv / "constraints.txt"), *packages], check=True, timeout=1200)
        purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        venv_site = Path(subprocess.run([str(python), "-c", purelib], check=True, capture_output=True,
                                        text=True).stdout.strip())
        link_dir = venv / "shared-torch"
        link_dir.mkdir()
        for path in shared:
            (link_dir / path.name).symlink_to(path)
        (venv_site / "ember-shared-torch.pth").write_text(f"{link_dir}\n")
        stamp.write_text(wanted)
    return python


def test_data_prep_tokenizer_is_the_same_in_transformers_4_and_5(data_dir, transformers4_python):
    directory = data_dir / "tokenizer"
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in config and "<|im_end|>" in config["additional_special_tokens"]
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    old, new = run_transformers4(transformers4_python, directory)["tokenizer"], probe(directory)
    assert old == new
    assert new["fast"] and new["specials"] == ["<|endoftext|>", "<|endoftext|>", "<|pad|>", None]
    assert new["ids"] == new["ids_no_specials"]  # neither adds BOS or EOS
    assert new["split_specials"][3] == encode_documents(AutoTokenizer.from_pretrained(directory), TEXTS)[3]
    assert new["decoded"] == TEXTS
    assert new["prompt"].endswith("<|im_start|>assistant\n") and 1 in new["assistant_mask"]


def test_make_portable_keeps_what_transformers_5_loads(tmp_path):
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import train_tokenizer

    texts = [path.read_text() for path in sorted((REPO_ROOT / "data_prep").glob("*.py"))]
    portable = train_tokenizer(texts, TokenizerConfig(vocab_size=400), tmp_path / "portable")
    # The form transformers 5 writes, as a training run's checkpoint has it.
    portable.save_pretrained(tmp_path / "v5")
    assert json.loads((tmp_path / "v5" / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    fingerprint = tokenizer_fingerprint(tmp_path / "v5")
    assert make_portable(tmp_path / "v5") and not make_portable(tmp_path / "v5")  # a second call changes nothing
    assert tokenizer_fingerprint(tmp_path / "v5") == fingerprint == tokenizer_fingerprint(tmp_path / "portable")
    a, b = AutoTokenizer.from_pretrained(tmp_path / "portable"), AutoTokenizer.from_pretrained(tmp_path / "v5")
    for attr in ("all_special_tokens", "all_special_ids", "bos_token", "eos_token", "pad_token", "chat_template",
                 "model_max_length", "extra_special_tokens"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a(TEXTS)["input_ids"] == b(TEXTS)["input_ids"]


def test_make_portable_states_a_bos_the_post_processor_adds(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<s>", "</s>"])
    backend.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(tmp_path / "v5")
    before = AutoTokenizer.from_pretrained(tmp_path / "v5")(TEXTS)["input_ids"]
    assert make_portable(tmp_path / "v5")
    config = json.loads((tmp_path / "v5" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    after = AutoTokenizer.from_pretrained(tmp_path / "v5")(TEXTS)["input_ids"]
    assert after == before and all(ids[0] == 0 and 0 not in ids[1:] for ids in after)


@pytest.mark.parametrize("overrides, stock_class", [
    pytest.param({}, "LlamaForCausalLM", id="llama"),
    pytest.param({"num_local_experts": 4, "num_experts_per_tok": 2}, "MixtralForCausalLM", id="mixtral"),
    pytest.param({"qk_norm": True}, "Qwen3ForCausalLM", id="qwen3"),
    pytest.param({"is_causal": False, "embedding_norm": True, "mlm_head_transform": True, "norm_type": "layernorm",
                  "mlp_type": "geglu", "hidden_act": "gelu", "num_key_value_heads": 4, "attention_bias": True},
                 "ModernBertForMaskedLM", id="modernbert")])
def test_to_hf_export_loads_in_transformers_4_with_equal_logits(data_dir, transformers4_python, tmp_path, overrides,
                                                                stock_class):
    torch.manual_seed(0)
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    config = EmberConfig.from_preset("nano", **{**shape, **overrides})
    model = randomize((EmberForCausalLM if config.is_causal else EmberForMaskedLM)(config))
    model.save_pretrained(tmp_path / "ember")
    # A checkpoint's tokenizer as the Trainer saves it: transformers 5's form, which 4.x cannot read.
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(tmp_path / "ember")
    saved = json.loads((tmp_path / "ember" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "TokenizersBackend" and isinstance(saved["extra_special_tokens"], list)
    to_hf(tmp_path / "ember", tmp_path / "hf")

    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    loaded = run_transformers4(transformers4_python, tmp_path / "hf", ids.tolist(), tmp_path / "logits.pt")
    assert loaded["tokenizer"] == probe(tmp_path / "hf")
    assert loaded["class"] == stock_class
    with torch.no_grad():
        expected = model(ids).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() <= 1e-5
