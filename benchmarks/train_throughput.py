"""Training throughput of Ember's pretraining recipe against stock `LlamaForCausalLM` of the same shape.

What it measures
----------------
Each row is a short real training run through the code path of `recipes/pretrain.py`: `PretrainingTrainer`,
`collate_packed`, `NonFiniteGuardCallback`, and `TrainingArguments` as the recipes set them (AdamW betas
0.9/0.95, weight decay 0.1, gradient clipping at 1.0, cosine schedule to 0.1 x peak; bf16 autocast with tf32 on
CUDA, float32 on CPU). The same harness, data and settings run

* `ember`: `EmberForCausalLM` from `--preset` plus `--model_overrides`,
* `llama`: stock transformers `LlamaForCausalLM` of the same shape (config from `modeling.convert`; the script
  refuses to run when the parameter counts differ).

`--warmup_steps` steps run first and are not timed (compilation, allocator and kernel caches); then a callback
stamps the end of each of `--steps` steps, after waiting for the device, so each step's time is its real
duration, data loading included. Reported per row: tokens/s, model TFLOP/s (`modeling.sizing.flops_per_token`,
so recomputation and the causal/document masks do not count), MFU against the datasheet peak of the device
(`modeling.sizing.PEAK_FLOPS`, or `--peak_flops`) and against the matmul peak measured here (a loop of square
`torch.matmul`s in the training precision), the peak memory (CUDA: `max_memory_allocated`; CPU: the peak resident
set of the row, reset between rows through /proc/self/clear_refs) next to `modeling.sizing.memory_per_gpu`'s
estimate, and, on Ember rows, the Ember / Llama tokens/s ratio of the matching row of the same run.

Variants: every combination of the comma-separated values of `--attn`, `--compile`, `--fused_adamw`, `--liger`,
`--position_ids` and `--activation_checkpointing` is one variant, run at each of `--batch_sizes` for each model
(the two models alternate which goes first). A flag given without a value means "on" (`--compile`); `on,off` runs
both. A row that runs out of device memory is reported as OOM and the sweep goes on; a variant that cannot run
here (flash-attention or Liger not installed, Liger on Ember) is reported as n/a. `--fused_adamw off` means
`optim="adamw_torch"`; note that `TrainingArguments` already defaults to the fused kernel on torch >= 2.8, so the
recipes, which leave `optim` unset, train with `--fused_adamw on`. With `--position_ids on` transformers derives a
block-diagonal (per-document) mask from the position_ids; `off` is plain causal attention over the whole row.

Data: packed blocks in Ember's format (input_ids, shift_labels and, with `--position_ids on`, per-document
position_ids) from `--data_dir` (a `python -m data_prep` output), or, by default, random tokens with EOS-separated
documents of geometric length (mean `--doc_len`) put through the same `block_to_example` as the real shards.

How to run
----------
    # 1x H100, bf16: the 1B and 125M shapes
    python benchmarks/train_throughput.py --preset 1b --seq_len 2048 --batch_sizes 4,8,16 --steps 20 \\
        --attn sdpa,flash_attention_2 --fused_adamw on,off --compile on,off
    python benchmarks/train_throughput.py --preset 125m --seq_len 1024 --batch_sizes 8,16,32 --liger on,off
    # CPU, tiny
    python benchmarks/train_throughput.py --device cpu --preset nano --seq_len 128 --batch_sizes 2 \\
        --model_overrides '{"num_hidden_layers": 2, "vocab_size": 1024}' --steps 3 --warmup_steps 1

A table is printed and the record (machine, command line, configs, peaks, every row with its raw step times) is
written as JSON to `--output` (default `benchmarks/results/train_throughput_<device>_<timestamp>.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from bench_common import available_cores, cpu_model_name, quartiles, save_record
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import is_flash_attn_2_available

from data_prep.token_dataset import PackedDataset, block_to_example
from data_prep.tokenizer import load_tokenizer
from modeling import EmberConfig, EmberForCausalLM, sizing
from modeling.convert import ember_config_to_hf
from training.arguments import for_installed_transformers
from training.callbacks import NonFiniteGuardCallback, device_peak_flops
from training.optim import lr_scheduler_kwargs
from training.trainer import PretrainingTrainer, collate_packed

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("ember", "llama")
SWITCHES = ("compile", "fused_adamw", "liger", "position_ids", "activation_checkpointing")


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def comma_list(parse_item):
    """An argparse type: "a,b,c" -> [parse_item(a), ...], order kept, duplicates dropped."""
    def parse(text: str) -> list:
        try:
            values = list(dict.fromkeys(parse_item(item.strip()) for item in text.split(",")))
        except (KeyError, ValueError):
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"not a valid comma-separated list: {text!r}")
        return values
    return parse


def positive_int(text: str) -> int:
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


on_off = comma_list({"on": True, "off": False}.__getitem__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training throughput of Ember vs stock LlamaForCausalLM through the pretraining recipe's Trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", type=comma_list({m: m for m in MODELS}.__getitem__), default=list(MODELS),
                        help="ember, llama or both")
    parser.add_argument("--preset", default="nano", help="EmberConfig preset")
    parser.add_argument("--model_overrides", default="{}", help="JSON object of EmberConfig fields over the preset")
    parser.add_argument("--seq_len", type=int, default=None, help="default: the shards' seq_len, else 1024")
    parser.add_argument("--batch_sizes", type=comma_list(positive_int), default=[8], help="per-device, e.g. 4,8,16")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row")
    parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps before the timed ones (>= 1)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--attn", type=comma_list(str), default=["sdpa"], help="implementations, e.g. sdpa,eager")
    for switch, default in (("compile", "off"), ("fused_adamw", "off"), ("liger", "off"), ("position_ids", "on"),
                            ("activation_checkpointing", "off")):
        parser.add_argument(f"--{switch}", type=on_off, nargs="?", const=[True], default=on_off(default),
                            metavar="on,off")
    parser.add_argument("--data_dir", type=Path, default=None, help="a data_prep output; default: synthetic tokens")
    parser.add_argument("--doc_len", type=int, default=512, help="mean document length of the synthetic data")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s for MFU (default: datasheet)")
    parser.add_argument("--matmul_size", type=int, default=None,
                        help="side of the square matmuls timed for the measured peak (default 8192 CUDA, 1024 CPU; "
                             "0 skips it)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/train_throughput_<device>_<timestamp>.json)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1 or args.doc_len < 1 or (args.seq_len is not None and args.seq_len < 1):
        parser.error("--steps, --warmup_steps, --doc_len and --seq_len must be >= 1")
    if args.peak_flops is not None and args.peak_flops <= 0:
        parser.error("--peak_flops must be positive")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    attn: str
    compile: bool
    fused_adamw: bool
    liger: bool
    position_ids: bool
    activation_checkpointing: bool

    @property
    def label(self) -> str:
        parts = [self.attn, "docpos" if self.position_ids else "causal"]
        parts += [name for name, on in (("compile", self.compile), ("fused", self.fused_adamw),
                                        ("liger", self.liger), ("ac", self.activation_checkpointing)) if on]
        return "+".join(parts)


def ember_and_llama_configs(preset: str, overrides: dict[str, Any]) -> tuple[EmberConfig, LlamaConfig]:
    """The Ember config and its stock `LlamaConfig` twin; ValueError when no such twin exists."""
    config = EmberConfig.from_preset(preset, **overrides)
    llama = ember_config_to_hf(config)
    if not isinstance(llama, LlamaConfig) or config.hidden_dropout:
        raise ValueError("model_overrides: the comparison is against stock Llama: no sliding window, MoE or "
                         "hidden_dropout")
    config.use_cache = llama.use_cache = False  # as in the recipe: no KV cache, so position_ids mask documents
    return config, llama


def build_model(name: str, config: EmberConfig, llama_config: LlamaConfig, attn: str, seed: int,
                device: str) -> PreTrainedModel:
    """float32 weights (the Trainer's bf16 is autocast), created on `device` ("meta": shapes only)."""
    torch.manual_seed(seed)
    model_class, model_config = (EmberForCausalLM, config) if name == "ember" else (LlamaForCausalLM, llama_config)
    with torch.device(device):  # initialising a 1B model on the CPU first would take longer than its timed steps
        model = model_class._from_config(model_config, attn_implementation=attn)
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"{name}: asked for attn_implementation={attn!r}, got {model.config._attn_implementation!r}")
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight counts once


class SyntheticPackedDataset(Dataset):
    """Random packed blocks in the format of `PackedDataset`: uniform non-EOS tokens, EOS with probability 1/doc_len.

    Documents therefore have geometric lengths with mean `doc_len`; the blocks go through the shards'
    `block_to_example`, so position_ids restart after every EOS exactly as for real data.
    """

    def __init__(self, num_examples: int, seq_len: int, vocab_size: int, eos_id: int, doc_len: int,
                 return_position_ids: bool, seed: int = 0):
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, vocab_size - 1, size=(num_examples, seq_len + 1), dtype=np.int64)
        blocks[blocks >= eos_id] += 1  # every id but EOS
        blocks[rng.random(blocks.shape) < 1.0 / doc_len] = eos_id
        self.blocks, self.eos_id, self.return_position_ids = blocks, eos_id, return_position_ids

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return block_to_example(self.blocks[index], self.eos_id, self.return_position_ids)


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Wall-clock stamp at the end of every optimizer step, taken once the device has finished the step."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def step_seconds(self, warmup_steps: int) -> list[float]:
        """Durations of the steps after the first `warmup_steps` (each from the previous step's end)."""
        return [b - a for a, b in zip(self.stamps[warmup_steps - 1:], self.stamps[warmup_steps:])]


def measure_matmul_peak(device: str, dtype: torch.dtype, size: int, iterations: int = 50, repeats: int = 5) -> float:
    """Best FLOP/s of `iterations` back-to-back size x size x size matmuls, over `repeats` timed runs."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            torch.matmul(a, b)
        synchronize(device)
        best = max(best, 2 * size**3 * iterations / (time.perf_counter() - start))
    del a, b
    return best


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_gib(device: str) -> tuple[float | None, str]:
    """(peak GiB since `reset_peak_memory`, what was measured)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30, "process_peak_rss"
    except OSError:
        pass
    return None, "unavailable"


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # drop compiled graphs, which hold on to the previous model


def unavailable_reason(name: str, variant: Variant, device: str) -> str | None:
    if variant.attn == "flash_attention_2" and not is_flash_attn_2_available():
        return "flash_attn is not installed"
    if variant.liger:
        if name == "ember":
            return "Liger patches only the model types it knows; 'ember' is not one"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        if device != "cuda":
            return "Liger kernels need CUDA"
    return None


def training_arguments(output_dir: str, variant: Variant, batch_size: int, max_steps: int, device: str,
                       args: argparse.Namespace) -> TrainingArguments:
    """The recipe's optimizer and schedule (recipes/configs/pretrain_*.yaml); no logging, evaluation or saving."""
    scheduler, scheduler_kwargs = lr_scheduler_kwargs("cosine", min_lr_ratio=0.1)
    cuda = device == "cuda"
    return TrainingArguments(**for_installed_transformers(dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type=scheduler, lr_scheduler_kwargs=scheduler_kwargs,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
        optim="adamw_torch_fused" if variant.fused_adamw else "adamw_torch",
        bf16=cuda, tf32=True if cuda else None, use_cpu=not cuda,
        torch_compile=variant.compile, use_liger_kernel=variant.liger,
        activation_checkpointing=variant.activation_checkpointing,
        remove_unused_columns=False,  # keep shift_labels and position_ids
        dataloader_drop_last=True, dataloader_num_workers=args.dataloader_num_workers,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed,
    )))


def run_row(name: str, variant: Variant, batch_size: int, setup: dict[str, Any], args: argparse.Namespace) -> dict:
    """Train `args.warmup_steps + args.steps` steps of one model in one variant; return the row."""
    device, seq_len = setup["device"], setup["seq_len"]
    row: dict[str, Any] = {"model": name, "variant": variant.label, "settings": dataclasses.asdict(variant),
                           "batch_size": batch_size, "seq_len": seq_len, "steps": args.steps,
                           "warmup_steps": args.warmup_steps}
    # One process, no accumulation: the Trainer frees the gradients every step. With position_ids, batches that
    # pack several documents give sdpa and eager a mask.
    memory = sizing.memory_per_gpu(setup["config"], 1, "ddp", batch_size, seq_len, variant.activation_checkpointing,
                                   param_bytes=2 if device == "cuda" else 4, flash_attention=variant.attn != "eager",
                                   attention_mask=variant.position_ids and variant.attn in ("sdpa", "eager"),
                                   gradients_persist=False)
    row["estimated_memory_gib"] = memory["total"] / 2**30
    reason = unavailable_reason(name, variant, device)
    if reason:
        return {**row, "status": f"n/a: {reason}"}

    model = trainer = None
    failure = None
    free_memory(device)
    reset_peak_memory(device)
    try:
        model = build_model(name, setup["config"], setup["llama_config"], variant.attn, args.seed, device)
        row["parameters"] = count_parameters(model)
        dataset = setup["make_dataset"](variant.position_ids, batch_size * (args.warmup_steps + args.steps))
        clock = StepClock(device)
        with tempfile.TemporaryDirectory() as output_dir:
            training_args = training_arguments(output_dir, variant, batch_size, args.warmup_steps + args.steps,
                                               device, args)
            guard = NonFiniteGuardCallback()  # as in the recipe: one gradient check and host sync per step
            trainer = PretrainingTrainer(model=model, args=training_args, train_dataset=dataset,
                                         data_collator=collate_packed, callbacks=[clock, guard])
            trainer.remove_callback(PrinterCallback)  # the end-of-training summary would break up the output
            result = trainer.train()
        seconds = clock.step_seconds(args.warmup_steps)
        peak_gib, memory_kind = peak_memory_gib(device)
    except Exception as err:  # one failing row (OOM, a compiler error) must not end the sweep
        # OOM inside a compiled graph may arrive wrapped in the compiler's own exception.
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            failure = "OOM"
        else:
            traceback.print_exc()
            failure = f"error: {type(err).__name__}: {' '.join(str(err).split())}"
    finally:
        if trainer is not None:
            trainer.accelerator.free_memory()  # the accelerator keeps the prepared model and optimizer
        del model, trainer
    free_memory(device)  # here, after the except block: its traceback held the failed step's tensors
    if failure:
        return {**row, "status": failure}

    if len(seconds) != args.steps:
        raise RuntimeError(f"{name} {variant.label}: timed {len(seconds)} steps, expected {args.steps}")
    tokens = args.steps * batch_size * seq_len
    tokens_per_s = tokens / sum(seconds)
    flops = setup["flops_per_token"] * tokens_per_s
    q1, median, q3 = quartiles(seconds)
    row.update({
        "status": "ok", "tokens": tokens, "seconds": sum(seconds), "tokens_per_s": tokens_per_s,
        "tflops": flops / 1e12,
        "mfu_datasheet": flops / setup["peak_flops"] if setup["peak_flops"] else None,
        "mfu_measured": flops / setup["measured_peak_flops"] if setup["measured_peak_flops"] else None,
        "peak_memory_gib": peak_gib, "peak_memory_kind": memory_kind,
        "estimate_error_pct": 100 * (row["estimated_memory_gib"] - peak_gib) / peak_gib if peak_gib else None,
        "train_loss": result.training_loss, "skipped_steps": guard.skipped_steps,
        "step_seconds": seconds, "step_seconds_median": median, "step_seconds_q1": q1, "step_seconds_q3": q3,
    })
    return row


def add_ratios(rows: list[dict]) -> None:
    """On each Ember row: its tokens/s over that of the Llama row with the same variant and batch size."""
    llama = {(r["variant"], r["batch_size"]): r for r in rows if r["model"] == "llama" and r["status"] == "ok"}
    for row in rows:
        other = llama.get((row["variant"], row["batch_size"]))
        if row["model"] == "ember" and row["status"] == "ok" and other:
            row["ember_over_llama"] = row["tokens_per_s"] / other["tokens_per_s"]


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(), "cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(),
        "cpus_available": available_cores(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(), "device": device,
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(), "gpu_memory_gib": properties.total_memory / 2**30,
                     "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version()})
    for package in ("accelerate", "flash_attn", "liger_kernel"):
        try:
            info[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            info[package] = None
    return info


def format_table(rows: list[dict], peak_flops: float | None) -> str:
    peak_label = f"MFU({peak_flops / 1e12:.0f})" if peak_flops else "MFU(peak)"
    columns = [("model", 6, "model", "s"), ("variant", 34, "variant", "s"), ("batch", 5, "batch_size", "d"),
               ("tokens/s", 10, "tokens_per_s", ".0f"), ("TFLOP/s", 8, "tflops", ".4g"),
               (peak_label, 9, "mfu_datasheet", ".1%"), ("MFU(mm)", 8, "mfu_measured", ".1%"),
               ("peak GiB", 8, "peak_memory_gib", ".2f"), ("est GiB", 8, "estimated_memory_gib", ".2f"),
               ("est err%", 8, "estimate_error_pct", "+.0f"), ("ember/llama", 11, "ember_over_llama", ".3f")]
    header = " ".join(f"{title:<{width}}" if spec == "s" else f"{title:>{width}}" for title, width, _, spec in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for _, width, key, spec in columns:
            value = row.get(key)
            text = "-" if value is None else format(value, spec)
            cells.append(f"{text:<{width}}" if spec == "s" else f"{text:>{width}}")
        line = " ".join(cells)
        lines.append(line if row["status"] == "ok" else f"{line}  {row['status']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Device, configs and data source; ValueError with a one-line message on bad input."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        overrides = json.loads(args.model_overrides)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model_overrides: not valid JSON ({err})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model_overrides: expected a JSON object, got {args.model_overrides!r}")

    train_dir = None
    if args.data_dir is not None:
        tokenizer = load_tokenizer(args.data_dir / "tokenizer")
        train_dir = args.data_dir / "tokens" / "train"
        shards = PackedDataset(train_dir)
        if args.seq_len is not None and args.seq_len != shards.seq_len:
            raise ValueError(f"--seq_len: {args.seq_len} differs from the shards' seq_len {shards.seq_len}")
        seq_len = shards.seq_len
        overrides = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **overrides}
    else:
        seq_len = args.seq_len or 1024
    overrides.setdefault("max_position_embeddings", seq_len)  # as recipes/pretrain.py does
    config, llama_config = ember_and_llama_configs(args.preset, overrides)
    if config.max_position_embeddings < seq_len:
        raise ValueError(f"max_position_embeddings: {config.max_position_embeddings} is shorter than seq_len {seq_len}")
    eos_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0

    def make_dataset(position_ids: bool, num_examples: int) -> Dataset:
        if train_dir is not None:
            return PackedDataset(train_dir, return_position_ids=position_ids)
        return SyntheticPackedDataset(num_examples, seq_len, config.vocab_size, eos_id, args.doc_len, position_ids,
                                      seed=args.seed)

    return {"device": device, "overrides": overrides, "config": config, "llama_config": llama_config,
            "seq_len": seq_len, "make_dataset": make_dataset, "data": str(args.data_dir) if train_dir else "synthetic",
            "flops_per_token": sizing.flops_per_token(config, seq_len)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        setup = prepare(args)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError too
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    device, config = setup["device"], setup["config"]

    n_params, n_llama = (count_parameters(build_model(name, config, setup["llama_config"], "sdpa", 0, "meta"))
                         for name in MODELS)
    if n_params != n_llama:
        print(f"error: Ember has {n_params:,} parameters, the stock Llama {n_llama:,}: not the same shape",
              file=sys.stderr)
        return 1

    setup["peak_flops"] = device_peak_flops(args.peak_flops) if device == "cuda" else args.peak_flops
    matmul_size = args.matmul_size if args.matmul_size is not None else (8192 if device == "cuda" else 1024)
    matmul_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    setup["measured_peak_flops"] = (measure_matmul_peak(device, matmul_dtype, matmul_size, *(() if device == "cuda"
                                    else (5, 3))) if matmul_size else None)
    info = machine_info(device)

    print(f"machine: {info.get('gpu', info['cpu_model'])} | {info['cpus_available']} cores | torch {info['torch']} | "
          f"transformers {info['transformers']}")
    print(f"model:   preset={args.preset} overrides={setup['overrides']} | {n_params / 1e6:.2f}M params (both) | "
          f"{setup['flops_per_token'] / 1e9:.4f} GFLOP/token at seq {setup['seq_len']}")
    print(f"run:     {device} {'bf16 autocast' if device == 'cuda' else 'float32'} | data {setup['data']} | "
          f"{args.warmup_steps} warm-up + {args.steps} timed steps per row")
    peak, measured = setup["peak_flops"], setup["measured_peak_flops"]
    print(f"peaks:   datasheet {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown'} | measured "
          f"{f'{measured / 1e12:.4g} TFLOP/s' if measured else '-'} ({matmul_size}^3 {str(matmul_dtype)[6:]} matmul)")

    variants = [Variant(*values) for values in itertools.product(args.attn, *(getattr(args, s) for s in SWITCHES))]
    rows = []
    load_before = os.getloadavg()
    for index, (variant, batch_size) in enumerate(itertools.product(variants, args.batch_sizes)):
        for name in args.models if index % 2 == 0 else args.models[::-1]:  # alternate who goes first
            row = run_row(name, variant, batch_size, setup, args)
            if row["status"] == "ok" and row["parameters"] != n_params:
                raise RuntimeError(f"{name}: {row['parameters']:,} parameters, expected {n_params:,}")
            rows.append(row)
            done = f"{row['tokens_per_s']:.0f} tokens/s" if row["status"] == "ok" else row["status"]
            print(f"  {name:<6} {variant.label:<34} batch {batch_size:>3}: {done}", flush=True)
    add_ratios(rows)
    load_after = os.getloadavg()

    print()
    print(format_table(rows, peak))
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min)")
    save_record("train_throughput", RESULTS_DIR, args.output, argv, info, load_before, load_after,
                name=f"train_throughput_{device}",
                settings={key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
                data=setup["data"], device=device, precision="bf16 autocast" if device == "cuda" else "float32",
                seq_len=setup["seq_len"], parameters=n_params, flops_per_token=setup["flops_per_token"],
                peak_flops=peak, measured_peak_flops=measured,
                matmul={"size": matmul_size, "dtype": str(matmul_dtype)},
                ember_config=config.to_diff_dict(), llama_config=setup["llama_config"].to_diff_dict(), rows=rows)
    return 1 if any(row["status"].startswith("error") for row in rows) else 0


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")  # as recipes/pretrain.py
    transformers.logging.set_verbosity_error()
    sys.exit(main())
