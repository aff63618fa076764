"""Everything Ember writes honours the umask (0644 files and 0755 folders under 022), as a plain `open` would:
atomic writes (mkstemp / mkdtemp) and safetensors would otherwise leave data runs and models private to
their owner, unreadable by a teammate or a serving container running as another user."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.config import load_config
from data_prep.pipeline import run_pipeline
from modeling.convert import to_hf
from modeling.gguf import to_gguf

REPO_ROOT = Path(__file__).resolve().parents[1]
STDLIB = REPO_ROOT / "recipes" / "configs" / "data" / "stdlib.yaml"


@pytest.fixture
def umask():
    def set_umask(mask: int) -> int:
        os.umask(mask)
        return mask

    old = os.umask(0o077)
    os.umask(old)
    yield set_umask
    os.umask(old)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Every file and folder under `root` (itself included) whose permission bits are not what the umask gives."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        if not path.is_symlink() and mode != expected:
            wrong.append(f"{path.relative_to(root)}: {oct(mode)}, expected {oct(expected)}")
    return wrong


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_data_run_honours_the_umask(tmp_path, umask, mask):
    umask(mask)
    cfg = load_config(STDLIB, [f"--output_dir={tmp_path / 'data'}", "--num_shards=1", "--sources.0.max_docs=20",
                               "--tokenizer.vocab_size=300", "--pack.seq_len=32", "--validation_fraction=0.1"])
    run_pipeline(cfg)
    assert (tmp_path / "data" / "tokenizer").is_dir() and list((tmp_path / "data").rglob("*.bin"))
    assert wrong_modes(tmp_path / "data", mask) == []


def test_a_training_run_and_its_exports_honour_the_umask(data_dir, tmp_path, umask):
    mask = umask(0o022)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "pretrain.py"), "--config",
         str(REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"), f"--data_dir={data_dir}",
         f"--output_dir={out}", "--max_steps=2", "--save_steps=2", "--warmup_steps=1", "--eval_strategy=no",
         "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1",
         "--model_overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
         "num_key_value_heads: 1}"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert wrong_modes(out, mask) == []

    to_hf(out, tmp_path / "hf")
    to_gguf(out, tmp_path / "gguf" / "model.gguf", "f32")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert wrong_modes(tmp_path / "hf", mask) == []
    assert wrong_modes(tmp_path / "gguf", mask) == []
