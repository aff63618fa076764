"""`to-gguf`: trained Ember checkpoints (dense and MoE) and a LoRA adapter in the real llama.cpp.

llama.cpp runs through its Python binding (llama-cpp-python, which compiles llama.cpp on install). Every
comparison is against transformers running the same checkpoint: tokenization on edge cases and held-out
documents, f32 logits, greedy generation, and q8_0 bits per byte against `evaluation.perplexity`.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from filelock import FileLock
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_prep.config import TokenizerConfig
from data_prep.documents import read_documents
from data_prep.tokenizer import encode_documents, train_tokenizer
from evaluation.perplexity import evaluate_perplexity, window_spans
from modeling import EmberConfig, EmberForCausalLM
from modeling.convert import main
from modeling.gguf import to_gguf

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
# Trained on 64-token blocks; 512 positions so that logits can be compared over a few hundred tokens.
NANO = "hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, " \
       "num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: false"
MOE = "num_local_experts: 4, num_experts_per_tok: 2"
F32_CACHE = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}  # its default cache is f16
EDGE_CASES = [
    "", " ", "a", "hello world", "   leading spaces, trailing   ", "runs      of\t\t\ttabs  \t and   spaces",
    "windows\r\nline\r\nendings\r\n\r\n", "\n\n\n\n", "mixed \r\n \n\r \t\n  \n",
    "family 👨\u200d👩\u200d👧\u200d👦 flag 🇺🇸 thumbs 👍🏽 parrot 🦜",
    "CJK 日本語の文章です。中文句子，한국어 문장",
    "RTL עברית ו-العربية \u200f\u202eabc\u202c",
    "digits 0 12 345 6789 3.14159 -1e-10 0x1F 1,000,000",
    "def f(x: int) -> int:\n    return x ** 2  # squared\n\nclass A:\n\tpass\n",
    "contractions I'M you're they'LL we'd it's DON'T",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 zero\u200bwidth nbsp\u00a0x",
    "control \x01\x07\x1b[31mred\x1b[0m \x7f",
    "markers Ġ Ċ ▁ <0x41> ## [PAD]",
    "special text <|endoftext|> <|im_start|>user\nhi<|im_end|>",
    "supplementary 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎 \U0010fffd",
]


def pretrain(data_dir: Path, out: Path, overrides: str) -> Path:
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--config", str(NANO_CPU), f"--data_dir={data_dir}", f"--output_dir={out}",
         f"--model_overrides={{{overrides}}}", "--max_steps=80", "--warmup_steps=8", "--eval_strategy=no",
         "--save_strategy=no", "--logging_steps=40", "--per_device_train_batch_size=8", "--learning_rate=3e-3"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def load_gguf(path: Path, n_ctx: int = 512) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=1, n_threads_batch=1,
                           logits_all=True, verbose=False, **F32_CACHE)


class Exported:
    """A trained checkpoint, its transformers model and tokenizer, and its GGUF exports loaded in llama.cpp."""

    def __init__(self, root: Path):
        self.checkpoint = root / "run"
        self.model = EmberForCausalLM.from_pretrained(self.checkpoint).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint)
        self.f32 = load_gguf(root / "model-f32.gguf")
        self.q8_0 = load_gguf(root / "model-q8_0.gguf")

    def close(self) -> None:
        self.f32.close()
        self.q8_0.close()


def trained_export(tmp_path_factory, data_dir: Path, name: str, overrides: str) -> Exported:
    """Train and export once per test session: pytest-xdist workers share the folder (under a lock)."""
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None  # then the parent of basetemp is this session's
    root = (tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()) / f"gguf-{name}"
    with FileLock(f"{root}.lock"):
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            pretrain(data_dir, root / "run", overrides)
            for outtype in ("f32", "q8_0"):
                to_gguf(root / "run", root / f"model-{outtype}.gguf", outtype)
            (root / "done").touch()
    return Exported(root)


@pytest.fixture(scope="module")
def dense(data_dir, tmp_path_factory, one_torch_thread):
    exported = trained_export(tmp_path_factory, data_dir, "dense", NANO)
    yield exported
    exported.close()


@pytest.fixture(scope="module")
def moe(data_dir, tmp_path_factory, one_torch_thread):
    exported = trained_export(tmp_path_factory, data_dir, "moe", f"{NANO}, {MOE}")
    yield exported
    exported.close()


@pytest.fixture(scope="module")
def qwen3(data_dir, tmp_path_factory, one_torch_thread):
    """QK-norm: exported as llama.cpp's qwen3 architecture."""
    exported = trained_export(tmp_path_factory, data_dir, "qwen3", f"{NANO}, qk_norm: true")
    assert exported.f32.metadata["general.architecture"] == "qwen3"
    yield exported
    exported.close()


@pytest.fixture(scope="module")
def held_out(data_dir) -> list[str]:
    """Held-out documents of the data_prep run, cut to 3,000 characters each to keep the test short."""
    return [text[:3000] for text in read_documents(data_dir / "documents" / "validation") if text.strip()][:6]


@pytest.fixture(params=["dense", "moe", "qwen3"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenization_equals_the_hf_tokenizer(exported, held_out):
    llm, tokenizer = exported.f32, exported.tokenizer
    texts = EDGE_CASES + held_out
    # Special-token text as text (how data_prep encodes documents) and as special tokens (tokenizer(text)).
    as_text = encode_documents(tokenizer, texts)
    for text, ids in zip(texts, as_text):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer(text)["input_ids"], text
        assert llm.detokenize(ids).decode("utf-8") == text
    assert sum(map(len, as_text)) > 3000


def test_special_tokens_bos_eos_and_chat_template(dense):
    llm, tokenizer = dense.f32, dense.tokenizer
    metadata = llm.metadata
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "qwen2"
    assert llm.token_bos() == tokenizer.bos_token_id and llm.token_eos() == tokenizer.eos_token_id
    assert int(metadata["tokenizer.ggml.padding_token_id"]) == tokenizer.pad_token_id
    # Ember's tokenizer adds no BOS; llama.cpp adds one to every prompt unless the GGUF says otherwise.
    assert not llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)
    assert llm.tokenize(b"x = 1", add_bos=True) == tokenizer("x = 1")["input_ids"]
    # Generation stops at the end of an assistant turn as well as at EOS.
    vocab = llm._model.vocab
    for token in ("<|endoftext|>", "<|im_end|>"):
        assert llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids(token))
    assert not llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids("<|im_start|>"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?\n"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    formatter = Jinja2ChatFormatter(metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token,
                                    bos_token=tokenizer.bos_token)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert formatter(messages=messages).prompt == expected
    assert "{% generation %}" in tokenizer.chat_template  # transformers' marker, which plain Jinja2 rejects
    assert "generation %}" not in metadata["tokenizer.chat_template"]


# --- model ------------------------------------------------------------------------------------------------------


def test_f32_logits_equal_transformers(exported, held_out):
    ids = encode_documents(exported.tokenizer, ["\n".join(held_out)])[0][:320]
    assert len(ids) == 320
    with torch.no_grad():
        expected = exported.model(torch.tensor([ids])).logits[0].double().numpy()
    difference = np.abs(llama_logits(exported.f32, ids) - expected).max()
    assert difference <= 1e-4, difference


def test_greedy_generation_is_token_identical(exported, held_out):
    prompt = encode_documents(exported.tokenizer, [held_out[0]])[0][:24]
    with torch.no_grad():
        generated = exported.model.generate(torch.tensor([prompt]), max_new_tokens=48, min_new_tokens=48,
                                            do_sample=False, use_cache=True)[0, len(prompt):].tolist()
    llm = exported.f32
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == 48:
            break
    assert len(generated) == 48 and tokens == generated


def llama_bits_per_byte(llm: llama_cpp.Llama, texts: list[str], eos_id: int, window: int, stride: int) -> float:
    """Bits per byte from llama.cpp's own tokens and logits, with the windows `evaluation.perplexity` scores."""
    total_nll, total_bytes = 0.0, 0
    for text in texts:
        stream = [eos_id] + llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        total_bytes += len(text.encode("utf-8"))
        for start, end, scored in window_spans(len(stream) - 1, window, stride):
            logits = llama_logits(llm, stream[start:end])
            log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            targets = stream[start + 1:end + 1]
            rows = range(len(targets) - scored, len(targets))
            total_nll -= sum(log_probs[row, targets[row]] for row in rows)
    return total_nll / (math.log(2) * total_bytes)


def test_q8_0_bits_per_byte_within_2_percent_of_ember(exported, held_out):
    expected = evaluate_perplexity(exported.model, exported.tokenizer, held_out, window=64, stride=32,
                                   progress=False).bits_per_byte
    measured = llama_bits_per_byte(exported.q8_0, held_out, exported.tokenizer.eos_token_id, window=64, stride=32)
    assert expected < 4.0  # a trained model, not noise
    assert abs(measured / expected - 1) <= 0.02, (measured, expected)


def test_f16_and_bf16_exports_run(dense, tmp_path, held_out):
    ids = encode_documents(dense.tokenizer, [held_out[1]])[0][:64]
    with torch.no_grad():
        expected = dense.model(torch.tensor([ids])).logits[0].double().numpy()
    for outtype, tolerance in (("f16", 0.02), ("bf16", 0.1)):
        to_gguf(dense.checkpoint, tmp_path / f"{outtype}.gguf", outtype)
        llm = load_gguf(tmp_path / f"{outtype}.gguf", n_ctx=64)
        try:
            assert llm.metadata["general.file_type"] == {"f16": "1", "bf16": "32"}[outtype]
            difference = np.abs(llama_logits(llm, ids) - expected).max()
        finally:
            llm.close()
        assert difference <= tolerance, (outtype, difference)


# --- LoRA adapter -----------------------------------------------------------------------------------------------


def test_lora_adapter_is_merged_and_exported_in_one_command(dense, tmp_path, held_out):
    base = EmberForCausalLM.from_pretrained(dense.checkpoint).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    adapted = get_peft_model(base, config)
    with torch.no_grad():  # a trained adapter's B is not zero: make the merge change the model
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    dense.tokenizer.save_pretrained(tmp_path / "adapter")  # as the finetuning recipe saves its output folder
    config_file = tmp_path / "adapter" / "adapter_config.json"
    assert json.loads(config_file.read_text())["base_model_name_or_path"] == str(dense.checkpoint)

    result = subprocess.run([sys.executable, "-m", "modeling.convert", "to-gguf", str(tmp_path / "adapter"),
                             str(tmp_path / "merged.gguf"), "--outtype=f32"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pre-tokenizer qwen2" in result.stdout
    ids = encode_documents(dense.tokenizer, [held_out[2]])[0][:64]
    with torch.no_grad():
        expected = adapted(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        unadapted = dense.model(torch.tensor([ids])).logits[0].double().numpy()
    llm = load_gguf(tmp_path / "merged.gguf", n_ctx=64)
    try:
        logits = llama_logits(llm, ids)
    finally:
        llm.close()
    assert np.abs(expected - unadapted).max() > 0.01  # the adapter matters
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("overrides", [
    pytest.param({"attention_bias": True, "mlp_bias": True}, id="biases"),
    pytest.param({"num_key_value_heads": 1, "head_dim": 32}, id="mqa-wide-heads"),
    pytest.param({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}, id="rope-linear"),
    pytest.param({"num_local_experts": 4, "num_experts_per_tok": 2, "attention_bias": True,
                  "tie_word_embeddings": True}, id="moe-biases-tied"),
    pytest.param({"qk_norm": True}, id="qk-norm-qwen3"),
    # Scaled RoPE on 60 tokens, past the 16 positions of the original context.
    pytest.param({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                      "original_max_position_embeddings": 16}}, id="rope-yarn"),
    pytest.param({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "beta_fast": 16,
                                      "beta_slow": 2, "attention_factor": 1.5,
                                      "original_max_position_embeddings": 16}}, id="rope-yarn-settings"),
    pytest.param({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
                 id="rope-llama3"),
    pytest.param({"qk_norm": True, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                       "original_max_position_embeddings": 16}}, id="qwen3-rope-yarn"),
    pytest.param({"qk_norm": True, "num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True},
                 id="qk-norm-qwen3-mqa-tied"),
])
def test_architecture_variants_have_equal_logits(data_dir, tmp_path, overrides):
    """Random weights of a larger scale than an initialisation, so biases and norms are checked too."""
    from test_convert import randomize

    model = randomize(EmberForCausalLM(EmberConfig.from_preset("nano", **{**TINY, **overrides})))
    model.save_pretrained(tmp_path / "ember")
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(tmp_path / "ember")
    to_gguf(tmp_path / "ember", tmp_path / "model.gguf", "f32")
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = load_gguf(tmp_path / "model.gguf", n_ctx=64)
    try:
        logits = llama_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(expected).max() > 1  # not a near-constant output
    assert np.abs(logits - expected).max() <= 1e-4


def test_an_embedding_larger_than_the_vocabulary_gets_placeholder_tokens(data_dir, tmp_path):
    src = save_tiny(tmp_path / "ember", data_dir / "tokenizer", vocab_size=520)  # the tokenizer has 512
    model = EmberForCausalLM.from_pretrained(src).eval()
    to_gguf(src, tmp_path / "padded.gguf", "f32")
    llm = load_gguf(tmp_path / "padded.gguf", n_ctx=64)
    try:
        assert llm.n_vocab() == 520
        ids = llm.tokenize(b"def f(x):\n    return x", add_bos=False)
        assert ids == encode_documents(AutoTokenizer.from_pretrained(src), ["def f(x):\n    return x"])[0]
        logits = llama_logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].double().numpy()
    assert logits.shape == (len(ids), 520) and np.abs(logits - expected).max() <= 1e-4


# --- refusals ---------------------------------------------------------------------------------------------------


TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def save_tiny(path: Path, tokenizer_dir: Path, **overrides) -> Path:
    EmberForCausalLM(EmberConfig.from_preset("nano", **{**TINY, **overrides})).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize(("overrides", "field"), [
    ({"sliding_window": 16}, "sliding_window"),
    ({"sliding_window": 16, "num_local_experts": 4}, "sliding_window"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type"),
    ({"position_embedding_type": "learned"}, "position_embedding_type"),
    ({"position_embedding_type": "sinusoidal"}, "position_embedding_type"),
    ({"norm_type": "layernorm"}, "norm_type"),
    ({"mlp_type": "gelu"}, "mlp_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"qk_norm": True, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16}}, "rope_parameters.rope_type"),
    ({"qk_norm": True, "num_local_experts": 4}, "num_local_experts"),
    ({"qk_norm": True, "attention_bias": True}, "attention_bias"),
    ({"qk_norm": True, "mlp_bias": True}, "mlp_bias"),
])
def test_settings_llama_cpp_cannot_run_are_refused(data_dir, tmp_path, overrides, field):
    src = save_tiny(tmp_path / "ember", data_dir / "tokenizer", **overrides)
    with pytest.raises(ValueError, match=rf"^{field}: ") as error:
        to_gguf(src, tmp_path / "out.gguf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".out.gguf*"))


def bpe_with(pre_tokenizer, normalizer=None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.normalizer = normalizer
    from tokenizers import trainers

    backend.train_from_iterator(["some text to learn merges from, " * 50],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.mark.parametrize("kind", ["unigram", "wordpiece", "gpt2-regex", "normalizer"])
def test_tokenizers_without_a_llama_cpp_pre_tokenizer_type_are_refused(tmp_path, kind):
    if kind in ("unigram", "wordpiece"):
        texts = [path.read_text() for path in sorted((REPO_ROOT / "data_prep").glob("*.py"))[:4]]
        tokenizer = train_tokenizer(texts, TokenizerConfig(model=kind, vocab_size=500), tmp_path / "tok")
        expected = "model: a " + repr({"unigram": "Unigram", "wordpiece": "WordPiece"}[kind])
    elif kind == "gpt2-regex":
        tokenizer = bpe_with(pre_tokenizers.ByteLevel(add_prefix_space=False))
        expected = "pre_tokenizer: expected a Split regex"
    else:
        split = pre_tokenizers.Split(Regex(r"\s+|\S+"), behavior="isolated")
        tokenizer = bpe_with(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)]),
                             normalizer=normalizers.NFKC())
        expected = "normalizer: "
    EmberForCausalLM(EmberConfig.from_preset("nano", **{**TINY, "vocab_size": len(tokenizer)})).save_pretrained(
        tmp_path / "ember")
    tokenizer.save_pretrained(tmp_path / "ember")
    with pytest.raises(ValueError) as error:
        to_gguf(tmp_path / "ember", tmp_path / "out.gguf")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'ember' / 'tokenizer.json'}: {expected}"), message
    assert "\n" not in message and not (tmp_path / "out.gguf").exists()


def test_data_prep_splits_text_with_the_regex_llama_cpp_calls_qwen2():
    from data_prep.tokenizer import PRETOKENIZE_REGEX
    from modeling.gguf import PRE_TOKENIZER_TYPES

    assert PRE_TOKENIZER_TYPES[PRETOKENIZE_REGEX] == "qwen2"


def test_a_split_regex_llama_cpp_does_not_know_is_refused(tmp_path):
    split = pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1,3}|\s+|[^\s\p{L}\p{N}]+"), behavior="isolated")
    tokenizer = bpe_with(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)]))
    EmberForCausalLM(EmberConfig.from_preset("nano", **{**TINY, "vocab_size": len(tokenizer)})).save_pretrained(
        tmp_path / "ember")
    tokenizer.save_pretrained(tmp_path / "ember")
    with pytest.raises(ValueError, match=r"pre_tokenizer: the split regex .* has no llama.cpp pre-tokenizer type"):
        to_gguf(tmp_path / "ember", tmp_path / "out.gguf")


def test_cli_errors_are_one_line(data_dir, tmp_path, capsys):
    save_tiny(tmp_path / "windowed", data_dir / "tokenizer", sliding_window=16)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/no/such"}))
    # The command as users run it: exit status 2 and one line, no traceback.
    result = subprocess.run([sys.executable, "-m", "modeling.convert", "to-gguf", str(tmp_path / "windowed"),
                             str(tmp_path / "a.gguf")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sliding_window: 16 cannot be exported to GGUF (llama.cpp's llama architecture attends to the whole "
        "context: outputs would differ past the window)")
    missing = tmp_path / "missing"
    cases = [([str(missing), str(tmp_path / "a.gguf")], f"error: {missing}: no such directory"),
             ([str(tmp_path / "adapter"), str(tmp_path / "a.gguf")], "base_model_name_or_path: '/no/such' is not a"),
             ([str(tmp_path / "windowed"), str(tmp_path)], f"error: {tmp_path}: is a folder"),
             ([str(tmp_path / "windowed"), str(tmp_path / "a.gguf"), "--outtype=q4_0"],
              "error: outtype: must be one of ['f32', 'f16', 'bf16', 'q8_0'], got 'q4_0'")]
    capsys.readouterr()  # what saving the tiny checkpoint printed
    for args, expected in cases:
        assert main(["to-gguf", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert not list(tmp_path.glob("*.gguf"))


def test_to_hf_warns_that_llama_cpp_drops_the_sliding_window(data_dir, tmp_path):
    from modeling.convert import to_hf

    save_tiny(tmp_path / "ember", data_dir / "tokenizer", sliding_window=16)
    with pytest.warns(UserWarning, match=r"sliding_window=16: .*llama.cpp"):
        assert to_hf(tmp_path / "ember", tmp_path / "hf") == "MistralForCausalLM"
