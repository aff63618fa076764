"""Load a trained Ember-family checkpoint and generate text with it.

    model, tokenizer = load_for_generation("runs/nano-cpu")
    text = generate(model, tokenizer, "import os\n", max_new_tokens=64, temperature=0.8, top_p=0.95,
                    top_k=50, seed=0)

`load_for_generation` accepts every kind of folder the other recipes write:

* an Ember checkpoint (`recipes/pretrain.py` output, or any `EmberForCausalLM.save_pretrained`):
  loaded with the Auto classes `import modeling` registers, so Ember need not match the code files
  saved next to the weights;
* a stock Llama / Mistral / Mixtral checkpoint from `python -m modeling.convert to-hf`;
* a merged LoRA model: a full checkpoint like the two above;
* a peft adapter folder (`adapter_config.json`): the base model named in it is loaded the same way,
  the adapter is applied with peft and, by default, merged into the weights, which makes every
  generated token as cheap as the base model's.

The tokenizer comes from the folder itself, or for an adapter without one, from its base model.
Pretraining saves `use_cache=False` (packed rows need no KV cache); generation turns it back on.

`generate` is a thin layer over transformers' `GenerationConfig` and `model.generate`: temperature
0 decodes greedily, anything above samples with top-p / top-k. With `chat=True` the prompt becomes
one user message rendered with the tokenizer's chat template, and `<|im_end|>` ends the answer as
well as EOS. Pass a `transformers.TextStreamer` to see the text as it is produced.
"""

import copy
import json
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import BaseStreamer

CHAT_END_TOKEN = "<|im_end|>"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_for_generation(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    *,
    merge_adapter: bool = True,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer in `path` (full checkpoint or peft adapter folder), ready for `generate`.

    device: "auto" (all GPUs through accelerate's device map when CUDA is present, else MPS, else
        CPU) or a torch device string such as "cpu" or "cuda:1".
    dtype: "auto" (the checkpoint's dtype), "float32", "bfloat16" or "float16".
    merge_adapter: fold a LoRA adapter into the base weights instead of keeping a `PeftModel`.
    trust_remote_code: run the code files of checkpoints whose architecture transformers does not
        know (Ember's own are not needed: `import modeling` provides them).

    Raises a one-line `ValueError` naming the folder or setting for anything it cannot load.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model directory")
    load_kwargs = dict(dtype=_torch_dtype(dtype), device_map=_device_map(device), trust_remote_code=trust_remote_code)

    if (folder / ADAPTER_CONFIG_FILE).is_file():
        base_source = _adapter_base(folder)
        model = _load_adapter(folder, _load_causal_lm(base_source, load_kwargs), merge_adapter)
        tokenizer_sources = [folder, base_source]
    elif (folder / "config.json").is_file():
        model = _load_causal_lm(folder, load_kwargs)
        tokenizer_sources = [folder]
    else:
        raise ValueError(f"{folder}: not a model directory (no config.json or {ADAPTER_CONFIG_FILE})")

    tokenizer = _load_tokenizer(tokenizer_sources, folder)
    _prepare_for_generation(model, tokenizer, folder)
    return model, tokenizer


def _torch_dtype(name: str) -> str | torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _device_map(device: str) -> str:
    """What `from_pretrained(device_map=...)` gets: "auto" spreads a model over the GPUs with accelerate."""
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


def _load_causal_lm(source: str | Path, load_kwargs: dict) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except Exception as err:  # a corrupt or foreign checkpoint fails deep inside transformers / safetensors
        raise ValueError(f"{source}: cannot load model ({_first_line(err)})") from err


def _adapter_base(folder: Path) -> str | Path:
    """The base model an adapter was trained on: a local folder (absolute, or relative to the working
    directory or to the adapter folder) or a Hub id."""
    config_path = folder / ADAPTER_CONFIG_FILE
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config_path}: not a valid adapter config ({_first_line(err)})") from None
    if not base:
        raise ValueError(f"{config_path}: base_model_name_or_path is missing, so the base model is unknown")
    for candidate in (Path(base), folder / base):
        if candidate.is_dir():
            return candidate
    return base


def _load_adapter(folder: Path, base_model: PreTrainedModel, merge: bool) -> PreTrainedModel:
    from peft import PeftModel  # imported here: only adapter folders need it, and it is slow to import

    try:
        model = PeftModel.from_pretrained(base_model, folder)
    except Exception as err:  # a mismatched base fails inside peft with a shape or key error
        raise ValueError(f"{folder}: cannot apply the adapter to its base model ({_first_line(err)})") from err
    return model.merge_and_unload() if merge else model


def _load_tokenizer(sources: list[str | Path], folder: Path) -> PreTrainedTokenizerBase:
    for source in sources:
        local = Path(source)
        if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except Exception as err:  # a corrupt tokenizer.json fails deep inside tokenizers
            raise ValueError(f"{source}: cannot load tokenizer ({_first_line(err)})") from err
    raise ValueError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) next to the model")


def _prepare_for_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Eval mode, KV cache on, and the special ids `generate` needs, taken from the tokenizer when missing."""
    model.eval()
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                         "embeddings; they do not belong together")
    model.config.use_cache = True  # pretraining saves False: packed rows need no cache, decoding does
    generation_config = model.generation_config
    generation_config.use_cache = True
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = tokenizer.eos_token_id
    if generation_config.bos_token_id is None:
        generation_config.bos_token_id = tokenizer.bos_token_id
    if generation_config.pad_token_id is None:
        # Only one sequence is decoded at a time, so padding never shows; the id just silences a warning.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generation_config.pad_token_id = pad


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 50,
    seed: int = 0,
    chat: bool = False,
    streamer: BaseStreamer | None = None,
) -> str:
    """Continue `prompt` (or answer it, with `chat=True`) and return the generated text without the prompt.

    temperature 0 is greedy decoding (top_p, top_k and seed then do nothing); above 0 it samples,
    keeping the `top_k` most likely tokens (0: all) and the smallest set holding `top_p` of the
    probability. The same seed gives the same text on the same device and dtype. Generation stops
    after `max_new_tokens` or at EOS (and `<|im_end|>` in chat mode); special tokens are left out
    of the returned text, as `TextStreamer(tokenizer, skip_special_tokens=True)` leaves them out.
    """
    check_generation_settings(max_new_tokens, temperature, top_p, top_k)
    input_ids = encode_prompt(tokenizer, prompt, chat=chat)
    max_new_tokens = _fit_context(model, input_ids.shape[1], max_new_tokens)

    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, min_new_tokens=None, max_length=None, use_cache=True,
                  eos_token_id=stop_token_ids(model, tokenizer, chat=chat), num_return_sequences=1, num_beams=1)
    if temperature > 0:
        config.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    transformers.set_seed(seed)
    input_ids = input_ids.to(model.device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=config, streamer=streamer)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, chat: bool = False) -> torch.Tensor:
    """The prompt's ids, shape [1, n]: the text as the tokenizer encodes it, or with `chat=True`, one user
    message rendered by the chat template with the assistant turn opened. An empty plain prompt becomes
    the BOS token (EOS for Ember tokenizers), which is how every document starts in pretraining."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("chat: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already placed them
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("prompt: empty, and the tokenizer has no BOS or EOS token to start from")
        ids = [start]
    return torch.tensor([ids], dtype=torch.long)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, chat: bool = False) -> list[int]:
    """Every id that ends generation: the generation config's EOS ids, the tokenizer's EOS, and in chat
    mode the end-of-turn token."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    if chat:
        end_of_turn = tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN)
        if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
            raise ValueError(f"chat: the tokenizer has no {CHAT_END_TOKEN} token to end an answer with")
        ids.add(end_of_turn)
    ids.discard(None)
    return sorted(ids)


def check_generation_settings(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise a one-line `ValueError` naming the first out-of-range setting (before a slow model load, too)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0 (0 keeps every token), got {top_k}")


def _fit_context(model: PreTrainedModel, prompt_len: int, max_new_tokens: int) -> int:
    """Cap generation at the model's context length; a prompt that alone fills it is an error."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None:
        return max_new_tokens
    if prompt_len >= context:
        raise ValueError(f"prompt: {prompt_len} tokens leave no room in the model's context of {context} tokens")
    if prompt_len + max_new_tokens > context:
        warnings.warn(f"max_new_tokens: {max_new_tokens} new tokens after a {prompt_len}-token prompt exceed the "
                      f"context of {context}; generating {context - prompt_len}", UserWarning, stacklevel=3)
        return context - prompt_len
    return max_new_tokens


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
