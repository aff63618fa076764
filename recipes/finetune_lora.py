"""LoRA / QLoRA finetuning of an Ember checkpoint on instruction data with the HF Trainer.

    python -m data_prep.instructions --data_dir=outputs/data/stdlib --output=outputs/instructions/stdlib
    python recipes/finetune_lora.py --config recipes/configs/lora_nano_cpu.yaml [--key=value ...]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/finetune_lora.py \\
        --config recipes/configs/qlora_7b_1gpu.yaml

Keys: `BaseModelArguments`, `LoraArguments` and `InstructionDataArguments` (training/arguments.py), plus every
`transformers.TrainingArguments` field; `--help` lists them. `output_dir` receives the adapter
(adapter_config.json, adapter_model.safetensors, tokenizer) and `finetune_metrics.json` (response-only
validation loss before and after, parameter counts, data counts); with `merge: true`, `output_dir/merged/`
holds the base with the adapter folded in, a plain checkpoint that loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from cli import ConfigError
from modeling.loading import checkpoint_tokenizer, load_model, torch_dtype
from modeling.tokenizer_config import make_portable
from training.arguments import (
    FINETUNE_PATH_KEYS,
    BaseModelArguments,
    InstructionDataArguments,
    LoraArguments,
    parse_training_args,
)
from training.finetune import (
    InstructionCollator,
    InstructionDataset,
    add_lora,
    finetuning_trainer,
    lora_config,
    merge_adapter,
    parameter_counts,
    response_loss,
)
from training.interrupt import StopOnInterrupt
from training.run import recipe_main, run_from_command_line, train_and_finish

SCHEMAS = (BaseModelArguments, LoraArguments, InstructionDataArguments, TrainingArguments)


def parse(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
          overrides: Mapping[str, Any] | None = None) -> tuple:
    """(BaseModelArguments, LoraArguments, InstructionDataArguments, TrainingArguments) from a YAML and overrides."""
    return parse_training_args(SCHEMAS, argv, config=config, overrides=overrides, path_keys=FINETUNE_PATH_KEYS,
                               prog="recipes/finetune_lora.py", description=__doc__.split("\n\n")[0])


def load_inputs(model_args: BaseModelArguments, lora_args: LoraArguments, data_args: InstructionDataArguments):
    """Tokenizer, datasets and the LoRA-wrapped model; every problem is a one-line ValueError."""
    if not model_args.model_name_or_path or not Path(model_args.model_name_or_path).is_dir():
        raise ConfigError(f"model_name_or_path: checkpoint folder not found: {model_args.model_name_or_path!r}; "
                          "pretrain one with python recipes/pretrain.py --config "
                          "recipes/configs/pretrain_nano_cpu.yaml, or use the quickstart's outputs/quickstart/pretrain")
    for key in ("train_file", "validation_file"):
        path = getattr(data_args, key)
        if (key == "train_file" or path) and not Path(path or "").is_file():
            raise ConfigError(f"{key}: instruction file not found: {path!r}; write one with python -m data_prep."
                              "instructions --data_dir=outputs/data/stdlib --output=outputs/instructions/stdlib")
    dtype = torch_dtype(model_args.dtype)
    tokenizer = checkpoint_tokenizer(model_args.model_name_or_path)
    train = InstructionDataset(data_args.train_file, tokenizer, data_args.max_length)
    validation = (InstructionDataset(data_args.validation_file, tokenizer, data_args.max_length)
                  if data_args.validation_file else None)
    model = load_model(model_args.model_name_or_path, load_in_4bit=model_args.load_in_4bit, dtype=dtype,
                       attn_implementation=model_args.attn_implementation)
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"model_name_or_path: vocab_size {model.config.vocab_size} is smaller than the "
                                f"tokenizer's {len(tokenizer)} tokens")
    if data_args.max_length > model.config.max_position_embeddings:
        raise ConfigError(f"max_length: {data_args.max_length} exceeds the model's max_position_embeddings "
                                f"{model.config.max_position_embeddings}")
    model.config.use_cache = False  # training; the merged model's generation config is unaffected
    config = lora_config(model, r=lora_args.lora_r, alpha=lora_args.lora_alpha, dropout=lora_args.lora_dropout,
                         target_modules=lora_args.lora_target_modules, target_experts=lora_args.lora_target_experts)
    return tokenizer, train, validation, config, model


@recipe_main
def main(argv: Sequence[str] | None = None, *, config: str | Path | None = None,
         overrides: Mapping[str, Any] | None = None) -> int:
    """Run the recipe; `argv` as on the command line, or (from code) a `config` YAML plus typed `overrides`."""
    model_args, lora_args, data_args, args = parse(sys.argv[1:] if argv is None and config is None else argv,
                                                   config=config, overrides=overrides)
    set_seed(args.seed)
    tokenizer, train, validation, adapter_config, base = load_inputs(model_args, lora_args, data_args)
    model = add_lora(base, adapter_config)

    collator = InstructionCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    trainer = finetuning_trainer(model, args, train, collator, tokenizer, optimizer_options=lora_args)
    trainer.add_callback(StopOnInterrupt())  # Ctrl-C: finish the step, save it, stop
    autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    counts = parameter_counts(model)
    if trainer.is_world_process_zero():
        print(f"[finetune] {'QLoRA (4-bit base)' if model_args.load_in_4bit else 'LoRA'} r={lora_args.lora_r} on "
              f"{sorted(adapter_config.target_modules)}{' + experts' if adapter_config.target_parameters else ''} | "
              f"{counts['trainable']:,} of {counts['total']:,} parameters trainable "
              f"({counts['trainable_percent']:.2f}%) | {len(train):,} examples ({train.stats['truncated']} cut to "
              f"{data_args.max_length} tokens) | {args.max_steps} steps")

    def evaluate(stage: str) -> dict:
        result = response_loss(trainer.model, validation, collator, args.per_device_eval_batch_size, autocast)
        if trainer.is_world_process_zero():
            print(f"[finetune] response loss {stage} training: {result['loss']:.4f} "
                  f"(perplexity {result['perplexity']:.2f}, {result['tokens']:,} tokens)")
        return result

    metrics: dict = {"parameters": counts, "data": {"train": train.stats}}
    if validation is not None:
        metrics["data"]["validation"] = validation.stats
        metrics["eval_before"] = evaluate("before")
    return train_and_finish(  # saving and merging belong to the run too
        args, "finetune", train=lambda resume: trainer.train(resume_from_checkpoint=resume),
        finish=lambda result: _finish(trainer, result, metrics, model_args, lora_args, data_args, tokenizer,
                                      evaluate, validation is not None))


def _finish(trainer, result, metrics: dict, model_args: BaseModelArguments, lora_args: LoraArguments,
            data_args: InstructionDataArguments, tokenizer, evaluate, has_validation: bool) -> int:
    """After training: the response loss after, the adapter, the merged model, finetune_metrics.json."""
    args = trainer.args
    metrics["train"] = result.metrics
    if has_validation:
        metrics["eval_after"] = evaluate("after")
    trainer.save_model(args.output_dir)  # the adapter and the tokenizer
    if trainer.is_world_process_zero():
        make_portable(args.output_dir)  # the tokenizer loads in transformers 4.x too
    trainer.save_state()  # trainer_state.json: the loss curve

    if trainer.is_world_process_zero():
        output_dir = Path(args.output_dir)
        metrics["config"] = {**dataclasses.asdict(model_args), **dataclasses.asdict(lora_args),
                             **dataclasses.asdict(data_args), "learning_rate": args.learning_rate,
                             "max_steps": args.max_steps, "seed": args.seed}
        if lora_args.merge:
            merge_adapter(output_dir, output_dir / "merged", base_model=model_args.model_name_or_path,
                          tokenizer=tokenizer)
            metrics["merged_model"] = str(output_dir / "merged")
            print(f"[finetune] merged model -> {output_dir / 'merged'}")
        (output_dir / "finetune_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_from_command_line(main)
