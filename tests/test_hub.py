"""`python -m training.hub`: what an upload of a run sends, listed offline by the dry run."""

import os
import subprocess
import sys
from pathlib import Path

from training.hub import files_to_upload

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_run(folder: Path) -> None:
    for name, size in [("model.safetensors", 1000), ("config.json", 20), ("tokenizer.json", 30), ("README.md", 10),
                       ("run_report/loss.png", 40), ("checkpoint-10/model.safetensors", 1000),
                       ("checkpoint-10/optimizer.pt", 2000), ("stream_state_0.json", 5), (".git/HEAD", 5)]:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)


def test_the_upload_leaves_checkpoints_and_git_behind(tmp_path):
    make_run(tmp_path / "run")
    assert files_to_upload(tmp_path / "run") == [("README.md", 10), ("config.json", 20), ("model.safetensors", 1000),
                                                 ("run_report/loss.png", 40), ("tokenizer.json", 30)]


def test_dry_run_lists_files_and_target_without_network(tmp_path):
    make_run(tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "training.hub", str(tmp_path / "run"), "--repo_id=me/ember-nano",
                             "--revision=v1", "--dry_run"], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"would upload 5 files (0.0 MiB) from {tmp_path / 'run'} to "
                               "https://huggingface.co/me/ember-nano (revision v1)")
    assert [line.split()[-1] for line in lines[1:]] == ["README.md", "config.json", "model.safetensors",
                                                        "run_report/loss.png", "tokenizer.json"]
    missing = subprocess.run([sys.executable, "-m", "training.hub", str(tmp_path / "none"), "--repo_id=me/x"],
                             capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().endswith(f"error: {tmp_path / 'none'}: no such folder")
