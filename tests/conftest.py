"""Shared fixtures: tiny Ember configs that build and run in milliseconds on CPU."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A rank that dies on a signal (an abort in C++, a segfault) prints the Python stack of every thread first.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

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


# The start of a script run in a fresh process as a user without Ember would: Ember's packages cannot be imported.
WITHOUT_EMBER = textwrap.dedent("""
    import importlib.abc, sys
    class BlockEmber(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling", "data_prep", "training", "evaluation", "cli", "recipes"):
                raise ImportError(f"{name} must not be importable here")
    sys.meta_path.insert(0, BlockEmber())
""")

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


FIRST_FAILURE_MARKS = ("Traceback (most recent call last)", "Fatal Python error", "terminate called", "enforce fail",
                       "error:")


def launch_failure(result, keep: int = 3000) -> str:
    """What a failed launch printed, for an assertion message: the tails of stdout and stderr, then the first
    failure a rank reported (a traceback, an abort), placed last because a launcher's own summary of the
    failed ranks otherwise buries it and a log's tail is what gets read."""
    stdout, stderr = result.stdout or "", result.stderr or ""
    starts = [stderr.find(mark) for mark in FIRST_FAILURE_MARKS if mark in stderr]
    first = stderr[min(starts):][:keep] if starts else "(no rank reported a traceback or an abort)"
    return f"{stdout[-keep:]}\n{stderr[-keep:]}\n--- the first failure a rank reported ---\n{first}"


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


# A small stdlib run in 2 shards, which every executor (local, Ray, Slurm) must reproduce byte for byte.
STDLIB_CONFIG = REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml"
SMALL_RUN = ["--num_shards=2", "--sources.0.max_docs=40", "--tokenizer.vocab_size=512", "--pack.seq_len=64",
             "--validation_fraction=0.1"]


def every_output(root: Path) -> dict[str, bytes]:
    """Every file a run wrote, byte for byte, except the executor's own logs, the copy of the config (it
    names the executor) and the step timings in report.json."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or relative.parts[0] == "executor" or path.name == "pipeline_config.yaml":
            continue
        data = path.read_bytes()
        if relative == Path("report.json"):
            summary = json.loads(data)
            summary.pop("seconds")
            data = json.dumps(summary, sort_keys=True).encode()
        files[str(relative)] = data
    assert any(name.endswith(".bin") for name in files) or any(name.startswith("filtered/") for name in files)
    return files


@pytest.fixture(scope="session")
def small_local_run(tmp_path_factory):
    from data_prep.config import load_config
    from data_prep.pipeline import run_pipeline

    cfg = load_config(STDLIB_CONFIG, [f"--output_dir={tmp_path_factory.mktemp('local') / 'out'}", *SMALL_RUN])
    run_pipeline(cfg, workers=2)
    return cfg


def debian_program(program: str, target: str, ci_reason: str, needs_root: bool = False) -> str:
    """The path of a Debian program a test runs for real. `make test` installs it (`make <target>`, as root), so
    under CI its absence is an error (`ci_reason`); elsewhere the test is skipped."""
    import shutil

    path = shutil.which(program)
    if path is None or (needs_root and os.geteuid() != 0):
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must {ci_reason}: `make test` installs {program} (make {target})")
        pytest.skip(f"needs {'root and ' if needs_root else ''}Debian's {program} (make {target})")
    return path


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-machine Slurm (controller + this host as its node), started for the session; yields the
    environment (SLURM_CONF) its commands need. Needs root and Debian's slurmctld/slurmd/munge packages,
    which `make test` installs (make slurm-deps); CI must have them, elsewhere the tests are skipped."""
    import subprocess

    debian_program("slurmctld", "slurm-deps", "run the Slurm tests (slurmctld, slurmd and munge)", needs_root=True)
    scripts = REPO_ROOT / "tests" / "slurm"
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(scripts / "start_local_slurm.sh"), str(directory)], capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    yield {**os.environ, "SLURM_CONF": str(directory / "slurm.conf"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(["bash", str(scripts / "stop_local_slurm.sh"), str(directory)], timeout=60)
