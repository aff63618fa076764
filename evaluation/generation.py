"""Generate text with a trained Ember-family checkpoint.

    model, tokenizer = load_for_generation("runs/nano-cpu")
    text = generate(model, tokenizer, "import os\n", max_new_tokens=64, temperature=0.8, top_p=0.95,
                    top_k=50, seed=0)

`load_for_generation` takes every kind of folder `modeling.loading` reads (an Ember checkpoint, a stock
Llama / Mistral / Mixtral export, a merged LoRA model, or a peft adapter folder, merged into its base by
default, which makes every generated token as cheap as the base model's). Pretraining saves
`use_cache=False` (packed rows need no KV cache); generation turns it back on.

`generate` is a thin layer over transformers' `GenerationConfig` and `model.generate`: temperature
0 decodes greedily, anything above samples with top-p / top-k. With `chat=True` the prompt becomes
one user message rendered with the tokenizer's chat template, and `<|im_end|>` ends the answer as
well as EOS. Pass a `transformers.TextStreamer` to see the text as it is produced.
"""

import copy
import warnings
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation import BaseStreamer

from data_prep.tokenizer import IM_END
from modeling.loading import load_checkpoint


def load_for_generation(path: str | Path, device: str = "auto", dtype: str = "auto", *, merge_adapter: bool = True,
                        trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`modeling.loading.load_checkpoint` (any checkpoint or adapter folder), made ready for `generate`."""
    model, tokenizer = load_checkpoint(path, device=device, dtype=dtype, merge_adapter=merge_adapter,
                                       trust_remote_code=trust_remote_code)
    prepare_for_generation(model, tokenizer)
    return model, tokenizer


def prepare_for_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Eval mode, KV cache on, and the special ids `generate` needs, taken from the tokenizer when missing."""
    model.eval()
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
        end_of_turn = tokenizer.convert_tokens_to_ids(IM_END)
        if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
            raise ValueError(f"chat: the tokenizer has no {IM_END} token to end an answer with")
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
