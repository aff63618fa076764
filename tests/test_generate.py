"""Tests of `evaluation.generation` and `recipes/generate.py` on a tiny Ember model with the data_prep tokenizer:
greedy decoding against a hand-rolled argmax loop, seeded sampling, streaming, the stock Llama export, a peft
adapter folder, chat mode, and the command line."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM, TextStreamer

from evaluation.generation import encode_prompt, generate, load_for_generation
from modeling import EmberForCausalLM
from modeling.convert import to_hf
from recipes import generate as recipe

RECIPE = REPO_ROOT / "recipes" / "generate.py"
PROMPT = "import os\n\ndef main("
NEW_TOKENS = 12
GREEDY = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, top_p=1.0, top_k=0, seed=0)


@pytest.fixture(scope="module")
def ember_dir(tmp_path_factory, data_dir) -> Path:
    """A tiny random Ember checkpoint saved the way pretraining saves one: with use_cache=False and the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    # A wide initialisation gives peaked, varied next-token distributions instead of near-uniform ones.
    model = tiny_model(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=0.3)
    model.config.use_cache = False
    path = tmp_path_factory.mktemp("ember")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(ember_dir):
    return load_for_generation(ember_dir, device="cpu")


def argmax_loop(model, input_ids: torch.Tensor, steps: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding by hand: full forward pass over the whole sequence, no KV cache, argmax of the last logits."""
    ids, new = input_ids.clone(), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            if token in stop_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_greedy_is_deterministic_and_equals_an_argmax_loop(loaded):
    model, tokenizer = loaded
    assert isinstance(model, EmberForCausalLM)
    assert model.config.use_cache is True  # saved as False, turned back on for decoding

    text = generate(model, tokenizer, PROMPT, **GREEDY)
    assert generate(model, tokenizer, PROMPT, **GREEDY) == text

    expected = argmax_loop(model, tokenizer(PROMPT, return_tensors="pt")["input_ids"], NEW_TOKENS,
                           {tokenizer.eos_token_id})
    assert len(set(expected)) > 3  # a varied continuation, so the comparison means something
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(loaded):
    model, tokenizer = loaded
    settings = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0)
    first = generate(model, tokenizer, PROMPT, seed=3, **settings)
    assert generate(model, tokenizer, PROMPT, seed=3, **settings) == first
    assert generate(model, tokenizer, PROMPT, seed=4, **settings) != first

    greedy = generate(model, tokenizer, PROMPT, **GREEDY)
    assert first != greedy
    top_1 = generate(model, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.95, top_k=1,
                     seed=5)
    assert top_1 == greedy


def test_streamer_prints_exactly_the_returned_text(loaded, capsys):
    model, tokenizer = loaded
    capsys.readouterr()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    text = generate(model, tokenizer, PROMPT, max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95, top_k=50,
                    seed=1, streamer=streamer)
    assert text
    assert capsys.readouterr().out == text + "\n"  # TextStreamer ends the stream with a newline


def test_stock_llama_export_generates_the_same_tokens(loaded, ember_dir, tmp_path):
    model, tokenizer = loaded
    assert to_hf(ember_dir, tmp_path / "llama") == "LlamaForCausalLM"
    llama, llama_tokenizer = load_for_generation(tmp_path / "llama", device="cpu")
    assert isinstance(llama, LlamaForCausalLM)
    assert llama.config.use_cache is True
    assert generate(llama, llama_tokenizer, PROMPT, **GREEDY) == generate(model, tokenizer, PROMPT, **GREEDY)


def test_peft_adapter_folder_loads_base_plus_adapter(loaded, ember_dir, tmp_path):
    model, tokenizer = loaded
    base = EmberForCausalLM.from_pretrained(ember_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    in_memory = get_peft_model(base, lora).eval()
    in_memory.save_pretrained(tmp_path / "adapter")  # adapter weights + config naming ember_dir; no tokenizer
    expected = generate(in_memory, tokenizer, PROMPT, **GREEDY)
    assert expected != generate(model, tokenizer, PROMPT, **GREEDY)  # the adapter changes the model

    merged, adapter_tokenizer = load_for_generation(tmp_path / "adapter", device="cpu")
    assert isinstance(merged, EmberForCausalLM)
    assert len(adapter_tokenizer) == len(tokenizer)  # taken from the base model's folder
    assert generate(merged, adapter_tokenizer, PROMPT, **GREEDY) == expected

    unmerged, _ = load_for_generation(tmp_path / "adapter", device="cpu", merge_adapter=False)
    assert isinstance(unmerged, PeftModel)
    assert generate(unmerged, adapter_tokenizer, PROMPT, **GREEDY) == expected


def test_chat_mode_renders_the_template_and_stops_at_im_end(loaded):
    model, tokenizer = loaded
    question = "What does os.path.join do?"
    rendered = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = encode_prompt(tokenizer, question, chat=True)
    assert tokenizer.decode(prompt_ids[0]) == rendered

    # Rewire the output head so the model says <|im_end|> where it would have said its third new token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = {tokenizer.eos_token_id, im_end}
    plain_tokens = argmax_loop(model, prompt_ids, 6, stops)
    assert len(plain_tokens) == 6 and plain_tokens[2] not in plain_tokens[:2]
    chatty = copy.deepcopy(model)
    with torch.no_grad():
        chatty.lm_head.weight[im_end] = 2 * chatty.lm_head.weight[plain_tokens[2]]
    assert argmax_loop(chatty, prompt_ids, 6, stops) == [*plain_tokens[:2], im_end]

    answer = generate(chatty, tokenizer, question, chat=True, **GREEDY)
    assert answer == tokenizer.decode(plain_tokens[:2])
    # Without chat mode only EOS stops it: the same rendered text runs on past <|im_end|>.
    continued = generate(chatty, tokenizer, rendered, chat=False, **GREEDY)
    assert continued.startswith(answer) and len(continued) > len(answer)


def test_bad_inputs_are_one_line_value_errors(loaded, tmp_path):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=f"^{tmp_path / 'missing'}: no such model directory$"):
        load_for_generation(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a model directory"):
        load_for_generation(tmp_path)
    with pytest.raises(ValueError, match="^dtype: "):
        load_for_generation(tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="^top_p: must be in"):
        generate(model, tokenizer, PROMPT, max_new_tokens=4, temperature=1.0, top_p=0.0, top_k=0, seed=0)


def run_cli_in_process(*argv: str) -> int:
    return recipe.main(list(argv))


def test_cli_streams_greedy_text_and_exits_0(loaded, ember_dir):
    model, tokenizer = loaded
    expected = generate(model, tokenizer, PROMPT, **{**GREEDY, "max_new_tokens": 8})
    result = subprocess.run(
        [sys.executable, str(RECIPE), f"--model={ember_dir}", f"--prompt={PROMPT}", "--temperature=0",
         "--max_new_tokens=8", "--device=cpu"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_cli_bad_input_is_one_line_error_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert run_cli_in_process(f"--model={missing}", "--prompt=x") == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: no such model directory\n"

    assert run_cli_in_process(f"--model={missing}", f"--prompt_file={tmp_path / 'no.txt'}") == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no.txt'}: no such prompt file\n"

    assert run_cli_in_process(f"--model={missing}", "--prompt=x", "--temperature=-1") == 2
    assert capsys.readouterr().err.startswith("error: temperature: must be >= 0")
