"""Shared fixtures: tiny Ember configs that build and run in milliseconds on CPU."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from modeling import EmberConfig, EmberForCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The pretraining recipe as tests launch it: the CPU config, 2-rank DDP, and a model small enough to run in seconds.
PRETRAIN_RECIPE = REPO_ROOT / "recipes" / "pretrain.py"
NANO_CPU = REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"
CPU_DDP = REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"
SMALL_MODEL = "--model_overrides={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, " \
              "num_attention_heads: 4, num_key_value_heads: 2}"

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(**overrides) -> EmberConfig:
    return EmberConfig.from_preset("nano", **{**TINY, **overrides})


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> EmberForCausalLM:
    torch.manual_seed(seed)
    model = EmberForCausalLM._from_config(tiny_config(**overrides), attn_implementation=attn_implementation)
    return model.eval()


def recipe_error(stderr: str) -> str:
    """The one error line a recipe printed, checking that it is the last line and comes without a traceback.

    Libraries may log their own warnings to stderr first (bitsandbytes does on CPUs with AVX512-BF16),
    so the check is on Ember's lines, not on the whole stream.
    """
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: a second thread gains them nothing, and on a busy CPU the hand-offs
    between threads can make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small real data_prep run on the stdlib corpus: tokenizer (vocab 512) and seq_len 64 shards."""
    from data_prep.config import load_config
    from data_prep.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("data") / "stdlib"
    cfg = load_config(REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml", [
        f"--output_dir={out}", "--num_shards=1", "--sources.0.max_docs=40", "--tokenizer.vocab_size=512",
        "--pack.seq_len=64", "--validation_fraction=0.1"])
    run_pipeline(cfg)
    return out
