"""recipes/pretrain.py with `objective: mlm | prefix_lm | ul2` and recipes/finetune_classifier.py end to end on CPU
(tiny models, the stdlib corpus), plus their one-line errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForTokenClassification

from data_prep.tasks import build_tasks, package_files
from data_prep.token_dataset import PackedDataset
from data_prep.tokenizer import load_tokenizer
from evaluation.classification import entity_scores
from evaluation.objectives import objective_metrics
from modeling import EmberForMaskedLM
from recipes import finetune_classifier, pretrain
from training.classification import TokenDataset, read_records
from training.objectives import MaskedLMCollator

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "recipes" / "configs"
SMALL_MODEL = ("--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
               "num_attention_heads: 4, num_key_value_heads: 2}")


def one_error(capsys) -> str:
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars share stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def objective_data(tmp_path_factory) -> Path:
    """A data_prep run whose tokenizer has the mask token and UL2's tokens (vocab 512, seq_len 64)."""
    from data_prep.config import load_config
    from data_prep.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("data") / "stdlib_objectives"
    cfg = load_config(CONFIGS / "data" / "stdlib.yaml", [
        f"--output_dir={out}", "--num_shards=1", "--sources.0.max_docs=40", "--tokenizer.vocab_size=512",
        "--pack.seq_len=64", "--validation_fraction=0.1", "--tokenizer.mask_token=true",
        "--tokenizer.num_sentinel_tokens=16"])
    run_pipeline(cfg)
    return out


def run_pretrain(config: str, *args: str) -> int:
    return pretrain.main(["--config", str(CONFIGS / config), SMALL_MODEL, "--logging_steps=5",
                                         "--warmup_steps=4", "--per_device_train_batch_size=8", *args])


@pytest.fixture(scope="module")
def encoder_dir(objective_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "encoder"
    assert run_pretrain("pretrain_encoder_nano_cpu.yaml", f"--data_dir={objective_data}", f"--output_dir={out}",
                    "--max_steps=60", "--eval_steps=30", "--save_steps=60", "--learning_rate=3e-3") == 0
    return out


def test_mlm_pretraining_lowers_held_out_masked_token_loss(encoder_dir, objective_data):
    config = json.loads((encoder_dir / "config.json").read_text())
    assert config["is_causal"] is False and config["use_cache"] is False
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_ember_heads.EmberForMaskedLM"
    state = json.loads((encoder_dir / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0]
    # The same held-out masks scored for the untrained and the trained encoder.
    tokenizer = load_tokenizer(encoder_dir)
    validation = PackedDataset(objective_data / "tokens" / "validation", return_position_ids=True)
    trained = EmberForMaskedLM.from_pretrained(encoder_dir)
    torch.manual_seed(0)
    untrained = EmberForMaskedLM(trained.config)
    before, after = (objective_metrics(model, validation, MaskedLMCollator(tokenizer, mask_rate=0.3), max_blocks=32)
                     for model in (untrained, trained))
    assert after["tokens"] == before["tokens"] > 100
    assert after["loss"] < before["loss"] - 0.5
    card = (encoder_dir / "README.md").read_text()
    assert "AutoModelForMaskedLM" in card and "pipeline_tag: fill-mask" in card
    assert "| Cross-entropy of the masked tokens (nats/token) |" in card and "to-hf" not in card


@pytest.mark.parametrize("objective", ["prefix_lm", "ul2"])
def test_prefix_lm_and_ul2_pretraining_runs_and_learns(objective, objective_data, tmp_path):
    out = tmp_path / objective
    assert run_pretrain("pretrain_nano_cpu.yaml", f"--objective={objective}", f"--data_dir={objective_data}",
                    f"--output_dir={out}", "--max_steps=24", "--eval_steps=12", "--save_steps=24") == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert "eval_perplexity" not in json.loads((out / "all_results.json").read_text())  # suffix loss only
    scored = {"prefix_lm": "suffix", "ul2": "target"}[objective]
    assert f"| Cross-entropy of the {scored} tokens (nats/token) |" in (out / "README.md").read_text()


def test_objective_errors_are_one_line(objective_data, data_dir, tmp_path, capsys):
    cases = [
        ("pretrain_encoder_nano_cpu.yaml", [f"--data_dir={data_dir}"], "error: tokenizer.mask_token: "),
        ("pretrain_nano_cpu.yaml", [f"--data_dir={objective_data}", "--objective=prefix_lm", "--prefix_tokens=80"],
         "error: prefix_tokens: 80 is not shorter than the blocks (64 tokens)"),
        ("pretrain_nano_cpu.yaml", [f"--data_dir={data_dir}", "--objective=ul2"],
         "error: tokenizer.num_sentinel_tokens: "),
        ("pretrain_nano_cpu.yaml", [f"--data_dir={objective_data}", "--objective=span"], "error: objective: "),
        ("pretrain_encoder_nano_cpu.yaml", [f"--data_dir={objective_data}", "--mask_rate=1.5"], "error: mask_rate: "),
        ("pretrain_nano_cpu.yaml", [f"--data_dir={objective_data}", "--model_overrides.is_causal=false"],
         "error: model_overrides.is_causal: objective 'clm' trains a decoder"),
        ("pretrain_encoder_nano_cpu.yaml", [f"--data_dir={objective_data}", "--model_overrides.is_causal=true"],
         "error: model_overrides.is_causal: objective 'mlm' trains a bidirectional encoder"),
    ]
    for config, args, message in cases:
        assert run_pretrain(config, f"--output_dir={tmp_path / 'out'}", *args) == 2
        assert one_error(capsys).startswith(message)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    files = [(name, path) for name, path in package_files() if path.name in ("message.py", "events.py")]
    build_tasks(out, max_per_label=60, max_lines=120, validation_fraction=0.3, files=files)
    return out


def finetune(config: str, *args: str) -> int:
    return finetune_classifier.main(["--config", str(CONFIGS / config), "--logging_steps=5",
                                                    "--warmup_steps=2", "--max_length=64", *args])


def test_sequence_classifier_finetunes_and_reports_the_baseline(encoder_dir, tasks, tmp_path):
    out = tmp_path / "package"
    assert finetune("classify_package_nano_cpu.yaml", f"--model_name_or_path={encoder_dir}", f"--output_dir={out}",
                    f"--train_file={tasks / 'package' / 'train.jsonl'}", "--max_steps=30",
                    f"--validation_file={tasks / 'package' / 'validation.jsonl'}", "--learning_rate=2e-3") == 0
    results = json.loads((out / "classifier_results.json").read_text())
    assert results["labels"] == ["asyncio", "email"] and results["task"] == "sequence"
    gold = [json.loads(line)["label"] for line in (tasks / "package" / "validation.jsonl").read_text().splitlines()]
    share = max(gold.count(label) for label in set(gold)) / len(gold)
    assert results["majority_baseline"]["accuracy"] == pytest.approx(share)
    assert results["margin_over_baseline"] == pytest.approx(results["validation"]["accuracy"] - share)
    assert results["train"]["train_loss"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "asyncio", "1": "email"} and saved["pad_token_id"] == 1
    assert saved["classifier_pooling"] == "mean"  # an encoder's default: its EOS summarises nothing


def test_token_classifier_with_lora_saves_a_merged_model_that_reproduces_its_score(encoder_dir, tasks, tmp_path):
    out = tmp_path / "calls"
    assert finetune("tag_calls_nano_cpu.yaml", f"--model_name_or_path={encoder_dir}", f"--output_dir={out}",
                    f"--train_file={tasks / 'calls' / 'train.jsonl'}", "--max_steps=30",
                    f"--validation_file={tasks / 'calls' / 'validation.jsonl'}") == 0
    results = json.loads((out / "classifier_results.json").read_text())
    assert results["majority_baseline"]["entity_f1"] == 0.0
    with safe_open(out / "model.safetensors", "pt") as weights:  # merged: plain weights, no adapter
        names = set(weights.keys())
    assert "score.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("lora" in name or "modules_to_save" in name for name in names)
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    tokenizer = load_tokenizer(out)
    labels = results["labels"]
    validation = TokenDataset(read_records(tasks / "calls" / "validation.jsonl", ("tokens", "tags")), tokenizer,
                              {label: i for i, label in enumerate(labels)}, 64)
    predicted = []
    for index, example in enumerate(validation.examples):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        predicted.append(validation.word_predictions(index, logits.argmax(-1), dict(enumerate(labels))))
    assert entity_scores(validation.tags, predicted)["f1"] == pytest.approx(results["validation"]["entity_f1"])


def test_classifier_errors_are_one_line(encoder_dir, tasks, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "def f(): pass", "label": "asyncio"}) + "\n"
                   + json.dumps({"text": "def g(): pass", "label": "json"}) + "\n")
    base = [f"--model_name_or_path={encoder_dir}", f"--output_dir={tmp_path / 'out'}",
            f"--train_file={tasks / 'package' / 'train.jsonl'}"]
    cases = [
        ([f"--validation_file={bad}"], f"error: {bad}:2: label: 'json' is not one of the labels ['asyncio', 'email']"),
        ([f"--validation_file={bad}", "--task=regression"], "error: task: expected sequence or token"),
        ([f"--validation_file={bad}", "--classifier_pooling=max"], "error: classifier_pooling: expected last or mean"),
        ([f"--validation_file={bad}", f"--model_name_or_path={tmp_path}"], "error: model_name_or_path: not a "),
        ([f"--validation_file={tasks / 'package' / 'validation.jsonl'}", "--max_length=4096"],
         "error: max_length: 4096 exceeds"),
    ]
    for args, message in cases:
        assert finetune("classify_package_nano_cpu.yaml", *base, *args) == 2
        assert one_error(capsys).startswith(message)


@pytest.mark.parametrize("name", ["pretrain_encoder_nano_cpu", "classify_package_nano_cpu", "tag_calls_nano_cpu"])
def test_recipe_configs_parse_and_name_their_hardware(name):
    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("# Hardware: ")
    recipe = pretrain if name.startswith("pretrain") else finetune_classifier
    parsed = recipe.parse(["--config", str(path)])
    assert parsed[-1].max_steps > 0
