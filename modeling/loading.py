"""The one way Ember loads a checkpoint: Ember or stock, merged or adapter, full precision or 4-bit.

    from modeling.loading import load_checkpoint, load_model
    model, tokenizer = load_checkpoint("outputs/quickstart/pretrain", device="auto")   # eval, generation
    base = load_model("outputs/quickstart/pretrain", load_in_4bit=True)                  # QLoRA training

A folder is one of:
* an Ember checkpoint (`recipes/pretrain.py` output or any `EmberForCausalLM.save_pretrained`), loaded through
  the Auto classes this package registers, so the code files saved next to the weights are not run;
* a stock Llama / Mistral / Mixtral checkpoint (`python -m modeling.convert to-hf`), or any causal LM
  transformers knows (others need `trust_remote_code`);
* a merged LoRA model: a full checkpoint like the two above;
* a peft adapter folder (`adapter_config.json`): its base model (a folder, absolute or relative to the working
  directory or to the adapter, or a Hub id) is loaded the same way, the adapter applied and, by default, merged.

`head` picks the model class: the causal LM by default, or one of Ember's task heads (`HEADS`: a masked-LM
encoder, a sequence or token classifier). A head loads from any Ember checkpoint, since they all keep the trunk
under `model.`: a masked-LM checkpoint initialises a classifier, whose new scoring layer is the only weight not
read from the folder. `model_kwargs` (`num_labels`, `id2label`, ...) go to the config.

The tokenizer comes from the folder itself or, for an adapter without one, from its base. Every problem is a
one-line `ValueError` naming the folder or setting, raised before a long load where it can be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import modeling  # noqa: F401  (the package registers Ember with the Auto classes this module loads through)
from cli import error_line

ADAPTER_CONFIG_FILE = "adapter_config.json"
# The files a saved tokenizer may consist of (a fast tokenizer, a SentencePiece model, BPE vocab + merges, ...).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
HEADS = {"causal_lm": AutoModelForCausalLM, "masked_lm": AutoModelForMaskedLM,
         "sequence_classification": AutoModelForSequenceClassification,
         "token_classification": AutoModelForTokenClassification}
DTYPES: dict[str, str | torch.dtype] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> str | torch.dtype:
    """A `dtype` setting ("auto", "float32", "bfloat16", "float16" or a torch dtype) as `from_pretrained` takes it."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def device_map_for(device: str | None) -> str | dict | None:
    """What `from_pretrained(device_map=...)` gets for a `device` setting.

    "auto": every GPU through accelerate's device map when CUDA is present, else MPS, else the CPU.
    None: no placement; the weights stay on the CPU for a Trainer to move. Otherwise a torch device string.
    """
    if device is None:
        return None
    if device == "auto":
        if torch.cuda.is_available():
            return "auto"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not a torch device (try auto, cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but this torch build sees no CUDA GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} asked for, but MPS is not available")
    return device


def quantization_config(compute_dtype: torch.dtype | None = None):
    """QLoRA's 4-bit storage: NF4 with double-quantized scales; matmuls in bf16 on GPU, fp32 on CPU."""
    from transformers import BitsAndBytesConfig

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def adapter_base(folder: str | Path) -> str | Path:
    """The base model a peft adapter folder was trained on: a local folder (absolute, or relative to the working
    directory or to the adapter folder), or else the Hub id as recorded."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG_FILE
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError, OSError) as err:
        raise ValueError(f"{config_path}: not a valid adapter config ({error_line(err)})") from None
    if not base:
        raise ValueError(f"{config_path}: base_model_name_or_path is missing, so the base model is unknown")
    for candidate in (Path(base), folder / base):
        if candidate.is_dir():
            return candidate
    return base


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def _model_folder(path: str | Path, dtype: str | torch.dtype) -> Path:
    """`path` checked to be a checkpoint or adapter folder, and `dtype` a known setting, before any slow load."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model directory")
    torch_dtype(dtype)
    if not is_adapter(folder) and not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a model directory (no config.json or {ADAPTER_CONFIG_FILE})")
    return folder


def load_model(path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | None = None,
               load_in_4bit: bool = False, attn_implementation: str | None = None, merge_adapter: bool = True,
               trust_remote_code: bool = False, head: str = "causal_lm", weights: bool = True,
               **model_kwargs: Any) -> PreTrainedModel:
    """The causal LM (or the `head`) in `path` (see the module docstring), in eval mode.

    dtype: the weights' dtype ("auto": as saved). With `load_in_4bit` the base is stored in NF4 (bitsandbytes)
        and computes in `quantization_config()`'s dtype.
    device: see `device_map_for`; a 4-bit model on CUDA goes to the current GPU as it is quantized.
    merge_adapter: fold a LoRA adapter into the base weights instead of returning a `PeftModel`.
    weights: False builds the checkpoint's architecture with freshly initialised weights (a baseline of the same
        shape); the folder's weights are not read.
    """
    folder = _model_folder(path, dtype)
    if head not in HEADS:
        raise ValueError(f"head: expected one of {', '.join(HEADS)}, got {head!r}")
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code, **model_kwargs}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    device_map = device_map_for(device)
    if load_in_4bit:
        bnb_config = quantization_config()
        kwargs.update(quantization_config=bnb_config, dtype=bnb_config.bnb_4bit_compute_dtype)
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}  # bitsandbytes quantizes as the weights reach the GPU
    if device_map is not None:
        kwargs["device_map"] = device_map

    if not weights:
        if is_adapter(folder) or load_in_4bit:
            raise ValueError(f"{folder}: a freshly initialised model is built from a full checkpoint's config, "
                             "not from an adapter or in 4-bit")
        try:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **model_kwargs)
        except Exception as err:
            raise ValueError(f"{folder}: cannot read the model config ({error_line(err)})") from err
        options = {key: kwargs[key] for key in ("attn_implementation", "trust_remote_code") if key in kwargs}
        if kwargs["dtype"] != "auto":
            options["dtype"] = kwargs["dtype"]
        model = HEADS[head].from_config(config, **options)
        return model.eval()
    if is_adapter(folder):
        base = _from_pretrained(adapter_base(folder), kwargs, HEADS[head])
        from peft import PeftModel  # only adapter folders need peft, and it is slow to import

        try:
            model = PeftModel.from_pretrained(base, str(folder))
        except Exception as err:  # a mismatched base fails inside peft with a shape or key error
            raise ValueError(f"{folder}: cannot apply the adapter to its base model ({error_line(err)})") from err
        model = model.merge_and_unload() if merge_adapter else model
    else:
        model = _from_pretrained(folder, kwargs, HEADS[head])
    return model.eval()


def load_strict(model_class: type[PreTrainedModel], src: str | Path) -> PreTrainedModel:
    """`model_class.from_pretrained` in the checkpoint's dtype, failing if any weight is missing, unexpected or
    misshapen: what the converters (`modeling.convert`, `modeling.gguf`) read a checkpoint with."""
    model, info = model_class.from_pretrained(src, dtype="auto", output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key) for key in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise ValueError(f"{kind}: {src} does not match {model_class.__name__}: {shown}")
    return model.eval()


def _from_pretrained(source: str | Path, kwargs: dict[str, Any], auto_class: type = AutoModelForCausalLM
                     ) -> PreTrainedModel:
    try:
        return auto_class.from_pretrained(str(source), **kwargs)
    except Exception as err:  # a corrupt or foreign checkpoint fails deep inside transformers / safetensors
        raise ValueError(f"{source}: cannot load the model ({error_line(err)})") from err


def checkpoint_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a checkpoint in `path`, or for an adapter folder without one, its base model's."""
    folder = Path(path)
    sources = [folder, adapter_base(folder)] if is_adapter(folder) else [folder]
    for source in sources:
        local = Path(source)
        if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except Exception as err:  # a corrupt tokenizer.json fails deep inside tokenizers
            raise ValueError(f"{source}: cannot load the tokenizer ({error_line(err)})") from err
        for key in ("local_files_only", "is_local"):  # loading options: a copy saved with them refuses the Hub
            tokenizer.init_kwargs.pop(key, None)
        return tokenizer
    raise ValueError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) next to the model")


def load_checkpoint(path: str | Path, tokenizer_path: str | Path | None = None, **options: Any
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_model(path, **options)` and its tokenizer (from `tokenizer_path` when given), checked to match."""
    folder = _model_folder(path, options.get("dtype", "auto"))
    tokenizer_folder = Path(tokenizer_path) if tokenizer_path is not None else folder
    if tokenizer_path is not None and not tokenizer_folder.is_dir():
        raise ValueError(f"{tokenizer_folder}: tokenizer folder not found")
    tokenizer = checkpoint_tokenizer(tokenizer_folder)
    model = load_model(path, **options)
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                         "embeddings; they do not belong together")
    return model, tokenizer
