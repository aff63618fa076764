"""The Hub model card (`README.md`) of a pretraining run: YAML metadata and a Markdown body.

`write_model_card(output_dir, ...)` uses `huggingface_hub.ModelCardData` (with a `model-index` for the validation
metrics); it works offline and reads nothing but its arguments and whether a run report sits next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from evaluation.perplexity import perplexity
from modeling.configuration_ember import EmberConfig
from modeling.sizing import active_parameters, count_parameters
from reporting.markdown import fmt_duration, fmt_number, is_finite, is_number, md_table
from reporting.run_report import REPORT_DIR, scored_tokens

CARD_TAGS = ["ember", "llama-style", "pretraining", "text-generation"]


def _human(count: float) -> str:
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:g}"


def _architecture_rows(config: EmberConfig) -> list[tuple[str, str]]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    attention = "multi-head" if kv_heads == heads else "multi-query" if kv_heads == 1 else "grouped-query"
    positions = config.position_embedding_type
    if positions == "rope":
        theta = (config.rope_parameters or {}).get("rope_theta")
        positions = f"RoPE (theta {theta:g})" if is_number(theta) else "RoPE"
    total = count_parameters(config)
    rows = [
        ("Layers", str(config.num_hidden_layers)),
        ("Hidden size", str(config.hidden_size)),
        ("MLP width", f"{config.intermediate_size} ({config.mlp_type})"),
        ("Attention heads / KV heads", f"{heads} / {kv_heads} ({attention}), head dim {config.head_dim}"),
        ("Vocabulary", f"{config.vocab_size:,}"),
        ("Context length", f"{config.max_position_embeddings:,}"),
        ("Positions", positions),
        ("Normalisation", f"{config.norm_type}, {config.norm_placement}" + (", QK-norm" if config.qk_norm else "")),
        ("Tied input/output embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("Parameters", f"{_human(total)} ({total:,})"),
    ]
    if config.sliding_window:
        rows.insert(6, ("Sliding window", f"{config.sliding_window:,}"))
    if not config.is_causal:
        rows.insert(0, ("Attention pattern", "bidirectional encoder"))
    if config.is_moe:
        rows.append(("Experts", f"{config.num_local_experts}, {config.num_experts_per_tok} per token "
                                f"({_human(active_parameters(config))} active parameters)"))
    return rows


# Training facts in the order they are listed; keys not named here follow under their own names.
_TRAINING_LABELS = {
    "tokens": "Tokens seen", "steps": "Optimizer steps", "tokens_per_step": "Tokens per step",
    "global_batch_size": "Global batch (sequences)", "seq_len": "Sequence length",
    "learning_rate": "Peak learning rate", "lr_schedule": "Learning-rate schedule", "warmup_steps": "Warmup steps",
    "weight_decay": "Weight decay", "optimizer": "Optimizer", "precision": "Precision", "hardware": "Hardware",
    "world_size": "Devices (world size)", "wall_seconds": "Wall time",
}


def _training_rows(training: dict) -> list[tuple[str, str]]:
    ordered = [key for key in _TRAINING_LABELS if key in training] + [k for k in training if k not in _TRAINING_LABELS]
    rows = []
    for key in ordered:
        value = training[key]
        if value is None:
            continue
        if key == "tokens" and is_number(value):
            text = f"{_human(value)} ({value:,.0f})"
        elif key == "wall_seconds" and is_finite(value):
            text = fmt_duration(value)
        elif isinstance(value, str):
            text = value
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = json.dumps(value, default=str)
        rows.append((_TRAINING_LABELS.get(key, key), text))
    return rows


def _eval_numbers(metrics: dict) -> dict[str, float]:
    """Validation loss and perplexity (computed from the loss when not given), and the run's mean train loss."""
    numbers = {}
    if is_finite(metrics.get("eval_loss")):
        numbers["eval_loss"] = float(metrics["eval_loss"])
        numbers["eval_perplexity"] = float(metrics.get("eval_perplexity") or perplexity(metrics["eval_loss"]))
    if is_finite(metrics.get("train_loss")):
        numbers["train_loss"] = float(metrics["train_loss"])
    return numbers


def _card_metadata(model_name: str, datasets: list[str], numbers: dict[str, float], license: str,
                   objective: str = "clm") -> ModelCardData:
    eval_results = None
    pipeline, task = ("fill-mask", "Masked language modeling") if objective == "mlm" else (
        "text-generation", "Causal language modeling")
    scored = scored_tokens(objective)
    if datasets and "eval_loss" in numbers:  # a model-index entry has to name the dataset it was measured on
        common = dict(task_type=pipeline, task_name=task, dataset_type=datasets[0],
                      dataset_name=datasets[0], dataset_split="validation")
        eval_results = [
            EvalResult(metric_type="perplexity", metric_name=f"Perplexity{scored}",
                       metric_value=round(numbers["eval_perplexity"], 4), **common),
            EvalResult(metric_type="loss", metric_name=f"Cross-entropy{scored} (nats/token)",
                       metric_value=round(numbers["eval_loss"], 4), **common),
        ]
    tags = [tag for tag in CARD_TAGS if objective != "mlm" or tag != "text-generation"]
    return ModelCardData(library_name="transformers", license=license, datasets=list(datasets) or None,
                         tags=tags, pipeline_tag=pipeline, model_name=model_name, eval_results=eval_results)


def _card_body(output_dir: Path, model_name: str, config: EmberConfig, datasets: list[str],
               numbers: dict[str, float], training: dict, repo_id: str | None, objective: str = "clm") -> str:
    location = repo_id or f"path/to/{model_name}"
    data = ", ".join(f"`{name}`" for name in datasets) if datasets else "data not recorded in this card"
    if config.is_causal:
        about = (f"{model_name} is a decoder-only, LLaMA-style language model pretrained from scratch with Ember "
                 f"on {data}. It is a base model: it continues text, and has not been tuned to follow instructions.")
        usage = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{location}", trust_remote_code=True)',
            f'model = AutoModelForCausalLM.from_pretrained("{location}", trust_remote_code=True)',
            'inputs = tokenizer("Once upon a time", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50)[0]))",
        ]
        export = [
            "To get a stock transformers checkpoint that needs no remote code (`LlamaForCausalLM`, or "
            "`MistralForCausalLM` / `MixtralForCausalLM` for sliding-window and mixture-of-experts models), "
            "convert it with Ember:", "",
            "```bash", f"python -m modeling.convert to-hf {location} {model_name}-hf", "```", "",
        ]
    else:
        about = (f"{model_name} is a bidirectional encoder pretrained from scratch with Ember by masked-language "
                 f"modelling on {data}. Finetune it as a classifier (`recipes/finetune_classifier.py`); the "
                 "evaluation numbers below are over masked tokens only.")
        usage = [
            "from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{location}", trust_remote_code=True)',
            f'model = AutoModelForMaskedLM.from_pretrained("{location}", trust_remote_code=True)',
            f'classifier = AutoModelForSequenceClassification.from_pretrained("{location}", num_labels=2, '
            "trust_remote_code=True)",
        ]
        export = []
    lines = [
        f"# {model_name}", "",
        about, "",
        "## Model", "", *md_table(("", "value"), _architecture_rows(config)), "",
        "## How to use", "",
        "The folder holds Ember's modeling code, so transformers loads it with `trust_remote_code=True` (the "
        "tokenizer runs no custom code; it takes the flag because `AutoTokenizer` reads the model's `config.json` "
        "first):", "",
        "```python", *usage, "```", "",
        *export,
        "## Training", "",
    ]
    rows = _training_rows(training)
    lines += [*md_table(("", "value"), rows), ""] if rows else ["No training details were recorded.", ""]
    lines += ["## Evaluation", ""]
    if "eval_loss" in numbers:
        lines += [f"On the held-out validation split of the training data ({data}):", "",
                  *md_table(("metric", "value"), [
                      (f"Cross-entropy{scored_tokens(objective)} (nats/token)", f"{numbers['eval_loss']:.4f}"),
                      (f"Perplexity{scored_tokens(objective)}", fmt_number(numbers["eval_perplexity"], ".2f"))]), ""]
    else:
        lines += ["No held-out evaluation was run.", ""]
    if "train_loss" in numbers:
        lines += [f"Mean training loss over the run: {numbers['train_loss']:.4f}.", ""]
    report = output_dir / REPORT_DIR
    if (report / "report.md").is_file():
        lines += ["## Training curves", ""]
        if (report / "loss.png").is_file():
            lines += [f"![Training loss]({REPORT_DIR}/loss.png)", ""]
        lines += [f"More plots and the run's numbers are in [{REPORT_DIR}/report.md]({REPORT_DIR}/report.md).", ""]
    lines += [
        "## Limitations", "",
        "The model reproduces the patterns, errors and biases of its training data, and it states false things "
        "fluently. It has had no safety or instruction tuning; check its output before relying on it.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: Path, *, model_name: str, config: EmberConfig | dict, datasets: list[str],
                     metrics: dict, training: dict, license: str = "apache-2.0",
                     repo_id: str | None = None, objective: str = "clm") -> Path:
    """Write `<output_dir>/README.md`, a Hub model card, and return its path.

    Args:
        model_name: the card's title and `model-index` name.
        config: the model's `EmberConfig`, or its dict (`config.to_dict()`, or preset-style fields).
        datasets: dataset names or Hub ids, for the metadata and the text.
        metrics: the run's metrics; `eval_loss`, `eval_perplexity` (else exp(eval_loss)) and `train_loss` are read.
        training: facts about the run, shown as given; known keys (tokens, steps, tokens_per_step,
            global_batch_size, seq_len, learning_rate, lr_schedule, warmup_steps, weight_decay, optimizer,
            precision, hardware, world_size, wall_seconds) get labels, others appear under their own names.
        license: a Hub license id.
        repo_id: the Hub id used in the loading example (default: a placeholder path).
        objective: the pretraining objective (`run_report.SCORED_TOKENS`), which says what the validation loss covers.

    Call it after `write_run_report` to have the card link the report and show the loss curve. Writing makes
    no network request.
    """
    output_dir = Path(output_dir)
    if isinstance(config, dict):
        config = EmberConfig.from_dict(config)
    datasets = list(datasets)
    numbers = _eval_numbers(metrics)
    scored_tokens(objective)  # an unknown objective is refused before anything is written
    card_data = _card_metadata(model_name, datasets, numbers, license, objective)
    body = _card_body(output_dir, model_name, config, datasets, numbers, training, repo_id, objective)
    # Built from our own text rather than `ModelCard.from_template`, whose default template is a long form of
    # placeholder sections; ModelCard still serialises and checks the metadata block.
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = output_dir / "README.md"
    card.save(path)
    return path

