"""recipes/pretrain.py end to end on CPU: a nano-sized model learns from data_prep shards, the output folder
is Hub-ready and loads elsewhere without Ember, and config mistakes are one-line errors."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import WITHOUT_EMBER, recipe_error

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
SMALL_MODEL = "--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
              "num_attention_heads: 4, num_key_value_heads: 2}"


def pretrain(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), "--config", str(NANO_CPU), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "nano"
    result = pretrain(f"--data_dir={data_dir}", f"--output_dir={out}", SMALL_MODEL, "--max_steps=40",
                      "--position_ids=true", "--warmup_steps=4", "--logging_steps=5", "--eval_steps=20",
                      "--save_steps=20", "--per_device_train_batch_size=4", "--gradient_accumulation_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_loss_falls_and_monitoring_is_logged(trained, data_dir):
    state = json.loads((trained / "checkpoint-40" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5 and losses == sorted(losses, reverse=True)
    logged = [entry for entry in state["log_history"] if "tokens_per_s" in entry]
    assert logged and all(entry["tokens_per_s"] > 0 and entry["tflops_per_device"] > 0 for entry in logged)
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    metrics = json.loads((trained / "all_results.json").read_text())
    assert metrics["eval_perplexity"] > 1
    # Evaluations also log bits per byte of the validation text: nats/token over ln 2 x bytes/token.
    from data_prep.pipeline import split_bytes_per_token

    bytes_per_token = split_bytes_per_token(data_dir)
    assert 1 < bytes_per_token < 8
    for entry in evals + [metrics]:
        assert entry["eval_bits_per_byte"] == pytest.approx(entry["eval_loss"] / math.log(2) / bytes_per_token)


def test_output_folder_is_hub_ready(trained):
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "configuration_ember.py", "modeling_ember.py", "README.md"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ember.EmberForCausalLM"
    tokenizer_config = json.loads((trained / "tokenizer_config.json").read_text())  # transformers 4.x reads it too
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == 64
    assert config["vocab_size"] == 512 and config["hidden_size"] == 64
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained / "README.md")
    assert card.data.library_name == "transformers" and "ember" in card.data.tags
    assert card.data.datasets == ["stdlib"] and card.data.license == "apache-2.0"
    assert "trust_remote_code=True" in card.text and "perplexity" in card.text.lower()
    report = (trained / "run_report" / "report.md").read_text()
    for plot in ("loss.png", "learning_rate.png", "grad_norm.png", "throughput.png"):
        assert (trained / "run_report" / plot).stat().st_size > 1000 and f"({plot})" in report


LOAD_AND_GENERATE = WITHOUT_EMBER + textwrap.dedent("""
    import json, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)  # reads config.json's auto_map
    ids = tokenizer("def main():", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    print(json.dumps({"new_tokens": out.shape[1] - ids.shape[1], "text": tokenizer.decode(out[0]),
                      "model_max_length": tokenizer.model_max_length,
                      "context": model.config.max_position_embeddings}))
""")


def test_output_loads_and_generates_in_a_fresh_process_without_ember(trained, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(trained)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["new_tokens"] > 0 and report["text"].startswith("def main():")
    assert report["model_max_length"] == report["context"] == 64  # the tokenizer knows the model's context
    assert "custom code" not in result.stderr and "model of type" not in result.stderr  # no prompt, no warning


def test_config_mistakes_are_one_line_errors(data_dir, tmp_path):
    result = pretrain(f"--data_dir={data_dir}", f"--output_dir={tmp_path}", "--learning_rat=0.1")
    assert result.returncode == 2
    assert recipe_error(result.stderr) == (
        "error: learning_rat: unknown key (did you mean 'learning_rate'? --help lists every key)")
    result = pretrain(f"--data_dir={data_dir}", f"--output_dir={tmp_path}", "--model_overrides={vocab_size: 1000}")
    assert result.returncode == 2
    assert recipe_error(result.stderr) == (
        "error: model_overrides.vocab_size: 1000 does not match the tokenizer's 512 tokens")
    result = pretrain(f"--data_dir={tmp_path / 'nothing'}", f"--output_dir={tmp_path}")
    assert result.returncode == 2 and recipe_error(result.stderr) == (
        f"error: data_dir: {tmp_path / 'nothing'} holds no data_prep run (no tokenizer/); make one with `make data` "
        "(python -m data_prep run --config recipes/configs/data/stdlib.yaml), or point --data_dir at one, e.g. the "
        "quickstart's outputs/quickstart/data")


def test_two_process_ddp_training_on_cpu(data_dir, tmp_path):
    """The CPU tier: accelerate starts 2 gloo ranks, each trains on its share of every global batch."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"), str(RECIPE), "--config", str(NANO_CPU),
               f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'ddp'}", SMALL_MODEL, "--max_steps=6",
               "--warmup_steps=1", "--logging_steps=2", "--eval_strategy=no", "--save_steps=6",
               "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout and "4,096 tokens/step" not in result.stdout
    assert "256 tokens/step" in result.stdout  # 2 ranks x 2 rows x 64 tokens
    state = json.loads((tmp_path / "ddp" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["train_batch_size"] == 2
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
