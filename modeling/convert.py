"""Convert checkpoints between Ember and transformers' stock classes (the LLaMA family; ModernBERT for encoders).

    python -m modeling.convert to-hf SRC DST     # Ember -> Llama / Mistral / Mixtral / Qwen3 ...ForCausalLM
    python -m modeling.convert from-hf SRC DST   # stock Llama / Mistral / Mixtral / Qwen3 -> EmberForCausalLM
    python -m modeling.convert to-gguf SRC OUT.gguf [--outtype=q8_0]   # llama.cpp, see modeling/gguf.py

Ember's module names are those of `LlamaForCausalLM` (and its MoE layers are laid out as
`MixtralForCausalLM` keeps them in memory), so both directions copy the state dict key for key,
with a strict check, and only the config needs translating.

Which stock class `to-hf` writes:

* `LlamaForCausalLM`: RoPE, RMSNorm, SwiGLU with SiLU, any head layout; biases allowed.
* `MistralForCausalLM`: the same with `sliding_window` set, and no biases.
* `MixtralForCausalLM`: `num_local_experts > 0` (with or without a sliding window), no attention bias.
* `Qwen3ForCausalLM`: `qk_norm` (RMSNorm over each head's queries and keys before RoPE, as Ember applies it),
  dense, without a sliding window or MLP biases.
* `ModernBertForMaskedLM`: an encoder (`EmberForMaskedLM`) built as ModernBERT is (modeling/convert_encoder.py).

Settings no stock class can express (ALiBi / learned / sinusoidal / relative positions, LayerNorm,
norms placed other than before each block, MLPs other than SwiGLU, an encoder, QK-norm with experts, a
sliding window or MLP biases, biases on Mistral / Mixtral) raise a one-line `ValueError` naming the field. So does an
activation other than SiLU: transformers would honour `hidden_act`, but vLLM and llama.cpp assume
SiLU for these architectures and would run a different model.

`hidden_dropout` is dropped with a warning: it is training-only, so the exported model computes
exactly what Ember does at inference. `attention_dropout` maps as is.

The exported `config.json` carries, next to transformers 5.x's `rope_parameters`, the legacy keys
older readers look for (transformers 4.x, vLLM, TGI, llama.cpp's convert script): a top-level
`rope_theta`, a `rope_scaling` dict when the RoPE type is not "default", and `torch_dtype`. It
has no `auto_map` and no code files, so it loads without `trust_remote_code`. Mixtral weights are
saved by transformers in Mixtral's original per-expert layout (`block_sparse_moe.experts.N.w1`),
which those readers expect. The tokenizer_config.json is rewritten in the form transformers 4.x reads
too (`modeling.tokenizer_config.make_portable`), so the export loads there with the same ids and logits.

llama.cpp runs a Mistral / Mixtral export without its sliding window (its `llama` architecture
attends to the whole context), so `to-hf` warns when it writes one; `to-gguf` refuses such models.
"""

import copy
import json
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from cli import ConfigError, honour_umask, parse_args, report_error

from . import EmberConfig, EmberForCausalLM, EmberForMaskedLM
from .convert_encoder import legacy_keys, modernbert_config, modernbert_state_dict
from .gguf import to_gguf
from .loading import TOKENIZER_FILES, load_strict  # TOKENIZER_FILES: copied verbatim from SRC to DST when present
from .tokenizer_config import make_portable

# Fields spelled the same, with the same meaning, in Ember and in the stock configs.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "hidden_act",
    "attention_dropout",
    "tie_word_embeddings",
    "initializer_range",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits")
# Fields only some stock classes have, also spelled the same on both sides.
TYPE_FIELDS = {
    "llama": ("attention_bias", "mlp_bias"),
    "mistral": ("sliding_window",),
    "mixtral": ("sliding_window", *MOE_FIELDS),
    "qwen3": ("attention_bias",),
}
STOCK_CLASSES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
GENERATION_CONFIG_FILE = "generation_config.json"
EMBER_CODE_FILES = ("configuration_ember.py", "modeling_ember.py", "modeling_ember_heads.py")


def stock_model_type(config: EmberConfig) -> str:
    """The stock `model_type` ("llama", "mistral", "mixtral" or "qwen3") that can hold this Ember config."""
    if config.qk_norm:
        return "qwen3"
    if config.num_local_experts > 0:
        return "mixtral"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


def ember_config_to_hf(config: EmberConfig) -> PreTrainedConfig:
    """Translate an Ember config into the equivalent `LlamaConfig`, `MistralConfig` or `MixtralConfig`.

    Raises a one-line `ValueError` naming the field for settings the stock class cannot express.
    """
    model_type = stock_model_type(config)
    config_class, model_class = STOCK_CLASSES[model_type]
    target = model_class.__name__
    _check_exportable(config, model_type, target)

    kwargs = {name: getattr(config, name) for name in (*SHARED_FIELDS, *TYPE_FIELDS[model_type])}
    kwargs["rms_norm_eps"] = config.norm_eps
    kwargs["rope_parameters"] = copy.deepcopy(dict(config.rope_parameters))
    if model_type == "mixtral":
        kwargs["router_jitter_noise"] = 0.0
    if config.hidden_dropout > 0:
        warnings.warn(
            f"hidden_dropout={config.hidden_dropout} is dropped: {target} has no residual dropout. It is "
            "training-only, so inference is unchanged; fine-tuning the export runs without it.",
            UserWarning,
            stacklevel=2,
        )
    return config_class(**kwargs)


def _check_exportable(config: EmberConfig, model_type: str, target: str) -> None:
    """Raise a one-line `ValueError` naming the first field `target` cannot express."""
    required = {"position_embedding_type": "rope", "norm_type": "rmsnorm", "mlp_type": "swiglu", "hidden_act": "silu",
                "norm_placement": "pre", "is_causal": True, "embedding_norm": False}
    for name, value in required.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"{name}: {getattr(config, name)!r} has no stock transformers equivalent ({target} needs {value!r})"
            )
    if model_type == "llama" and config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(
            f"num_attention_heads: {target} needs hidden_size={config.hidden_size} divisible by "
            f"num_attention_heads={config.num_attention_heads}"
        )
    if model_type in ("mistral", "mixtral") and config.attention_bias:
        raise ValueError(f"attention_bias: {target} has no attention biases")
    # EmberConfig forbids mlp_bias with MoE, so only a dense Mistral or Qwen3 export can hit this.
    if model_type in ("mistral", "qwen3") and config.mlp_bias:
        raise ValueError(f"mlp_bias: {target} has no MLP biases")
    if model_type == "qwen3":  # qk_norm: Qwen3's dense class is the stock one with QK-norm
        if config.num_local_experts > 0:
            raise ValueError(f"num_local_experts: {config.num_local_experts} with qk_norm=True has no stock "
                             f"transformers equivalent ({target} is dense)")
        if config.sliding_window is not None:
            raise ValueError(f"sliding_window: {config.sliding_window} with qk_norm=True has no stock transformers "
                             f"equivalent ({target} attends to the whole context)")


def hf_config_to_ember(config: PreTrainedConfig) -> EmberConfig:
    """Translate a stock `LlamaConfig`, `MistralConfig` or `MixtralConfig` into the equivalent `EmberConfig`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in STOCK_CLASSES:
        raise ValueError(f"model_type: expected one of {tuple(STOCK_CLASSES)}, got {model_type!r}")
    kwargs = {name: getattr(config, name) for name in (*SHARED_FIELDS, *TYPE_FIELDS[model_type])}
    kwargs["norm_eps"] = config.rms_norm_eps
    if model_type == "qwen3":
        if any(kind != "full_attention" for kind in config.layer_types or ()):
            raise ValueError("use_sliding_window: Ember has no per-layer sliding window; expected full attention "
                             "in every layer")
        kwargs["qk_norm"] = True
    # transformers keeps the legacy "type" alias next to "rope_type" when it read a `rope_scaling` dict.
    rope_parameters = copy.deepcopy(dict(config.rope_parameters or {}))
    rope_parameters.pop("type", None)
    kwargs["rope_parameters"] = rope_parameters
    if model_type == "mixtral" and config.router_jitter_noise > 0:
        warnings.warn(
            f"router_jitter_noise={config.router_jitter_noise} is dropped: Ember's router has none. It is "
            "training-only, so inference is unchanged.",
            UserWarning,
            stacklevel=2,
        )
    return EmberConfig(**kwargs)


def to_hf(src: str | Path, dst: str | Path) -> str:
    """Convert the Ember checkpoint in `src` to a stock transformers checkpoint in `dst`.

    Weights keep the checkpoint's dtype. Tokenizer files and `generation_config.json` are copied.
    Returns the name of the stock class written, e.g. "LlamaForCausalLM".
    """
    src, dst = _check_dirs(src, dst)
    model_type = _read_model_type(src)
    if model_type != EmberConfig.model_type:
        raise ValueError(f"model_type: {src} holds a {model_type!r} checkpoint, to-hf converts 'ember' ones")

    config = EmberConfig.from_pretrained(src)
    if config.is_causal:
        hf_config = ember_config_to_hf(config)  # refuses by field, before any loading
        ember = load_strict(EmberForCausalLM, src)
        hf_model = _rebuild_as(ember, hf_config)
    else:  # an encoder: ModernBERT (convert_encoder.py)
        hf_config = modernbert_config(config)
        ember = load_strict(EmberForMaskedLM, src)
        hf_model = _rebuild_as(ember, hf_config, AutoModelForMaskedLM,
                               modernbert_state_dict(ember.state_dict(), config))
    del ember

    hf_model.save_pretrained(dst)
    for name in EMBER_CODE_FILES:  # left over from an earlier Ember save into the same folder
        (dst / name).unlink(missing_ok=True)
    _copy_side_files(src, dst)
    if (dst / "tokenizer_config.json").is_file():
        make_portable(dst)
    if config.is_causal:
        _write_legacy_config_keys(dst / "config.json")
    else:
        saved = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**saved, **legacy_keys(hf_model.config)}, indent=2) + "\n")
    honour_umask(dst)  # safetensors writes its files 0600
    if config.is_causal and getattr(hf_model.config, "sliding_window", None) is not None:
        warnings.warn(
            f"sliding_window={hf_model.config.sliding_window}: transformers, vLLM and TGI apply it, but llama.cpp "
            "does not (its llama architecture attends to the whole context): its outputs differ past the window",
            UserWarning,
            stacklevel=2,
        )
    return type(hf_model).__name__


def from_hf(src: str | Path, dst: str | Path) -> None:
    """Convert a stock Llama / Mistral / Mixtral / Qwen3 checkpoint in `src` to an Ember checkpoint in `dst`.

    Weights keep the checkpoint's dtype. The Ember save writes its code files and `auto_map`, so the
    result loads anywhere with `trust_remote_code=True`. Tokenizer files and `generation_config.json`
    are copied.
    """
    src, dst = _check_dirs(src, dst)
    model_type = _read_model_type(src)
    if model_type not in STOCK_CLASSES:
        raise ValueError(f"model_type: expected one of {tuple(STOCK_CLASSES)} in {src}, got {model_type!r}")

    hf_model = load_strict(STOCK_CLASSES[model_type][1], src)
    ember = _rebuild_as(hf_model, hf_config_to_ember(hf_model.config))
    del hf_model

    ember.save_pretrained(dst)
    _copy_side_files(src, dst)
    honour_umask(dst)  # safetensors writes its files 0600


def _rebuild_as(model: PreTrainedModel, config: PreTrainedConfig, auto_class=AutoModelForCausalLM,
                state_dict: dict | None = None) -> PreTrainedModel:
    """A model of `config`'s class holding `model`'s weights (or `state_dict`, those weights renamed); the
    parameter names must match exactly."""
    target = auto_class.from_config(config, dtype=model.dtype)
    target.load_state_dict(model.state_dict() if state_dict is None else state_dict, strict=True)
    return target.eval()


def _check_dirs(src: str | Path, dst: str | Path) -> tuple[Path, Path]:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: not a model directory (no config.json)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the destination must differ from the source")
    return src, dst


def _read_model_type(src: Path) -> str | None:
    try:
        config = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{src / 'config.json'}: not valid JSON ({err})") from None
    return config.get("model_type")


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_legacy_config_keys(path: Path) -> None:
    """Add the pre-`rope_parameters` keys older readers need to an exported `config.json`, drop `auto_map`.

    transformers 5.x reads these back to the same `rope_parameters` (`rope_scaling` wins over it when
    both are present, so `rope_scaling` repeats every key but `rope_theta`, which stays top-level).
    """
    config = json.loads(path.read_text())
    config.pop("auto_map", None)
    rope = dict(config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope_type != "default":
        scaling = {key: value for key, value in rope.items() if key not in ("rope_theta", "type", "rope_type")}
        config["rope_scaling"] = {"rope_type": rope_type, "type": rope_type, **scaling}
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


COMMANDS = {"to-hf": "Ember checkpoint -> stock Llama / Mistral / Mixtral / Qwen3 / ModernBERT checkpoint",
            "from-hf": "stock Llama / Mistral / Mixtral / Qwen3 checkpoint -> Ember",
            "to-gguf": "Ember checkpoint or LoRA adapter -> one GGUF file for llama.cpp"}


@dataclass
class ConvertArguments:
    src: str = field(metadata={"help": "the checkpoint folder to convert (first positional argument)"})
    dst: str = field(metadata={"help": "the folder to write (second positional argument)"})


@dataclass
class GgufArguments:
    src: str = field(metadata={"help": "Ember checkpoint or LoRA adapter folder (first positional argument)"})
    out: str = field(metadata={"help": "the .gguf file to write (second positional argument)"})
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = field(default="f16", metadata={
        "help": "storage of the weight matrices (norms, biases and the MoE router stay f32)"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a bad input ends with a one-line `error:` message and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "python -m modeling.convert COMMAND SRC DST\n" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + "\ncommands:\n" + usage)
        return 0 if argv else 2
    command, argv = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise ConfigError(f"{command}: unknown command (one of {', '.join(COMMANDS)})")
        if command == "to-gguf":
            return _to_gguf_command(argv)
        (args,) = parse_args((ConvertArguments,), argv, prog=f"python -m modeling.convert {command}",
                             description=COMMANDS[command], positionals=("src", "dst"), path_keys=("src", "dst"))
        if command == "to-hf":
            class_name = to_hf(args.src, args.dst)
            print(f"wrote {class_name} to {args.dst}")
        else:
            from_hf(args.src, args.dst)
            print(f"wrote EmberForCausalLM to {args.dst}")
    except (ConfigError, ValueError, OSError) as err:
        return report_error(err)
    return 0


def _to_gguf_command(argv: list[str]) -> int:
    (args,) = parse_args((GgufArguments,), argv, prog="python -m modeling.convert to-gguf",
                         description=COMMANDS["to-gguf"], positionals=("src", "out"), path_keys=("src", "out"))
    written = to_gguf(args.src, args.out, args.outtype)
    print(f"wrote {written['outtype']} GGUF (llama.cpp architecture {written['architecture']}, "
          f"pre-tokenizer {written['pre_tokenizer']}) to {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
