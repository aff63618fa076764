"""Every command the README shows names an entry point that exists and settings it accepts, as written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Shell plumbing around the commands, not commands of Ember's: make (what CI runs), the venv, the sbatch
# template (its placeholders are the user's) and TensorBoard's own command (tests/test_dashboard.py runs it).
NOT_EMBER = re.compile(r"^(make|source|[a-z]=\$\(|C=|sbatch|python3 -m venv|\.venv/bin/pip|tensorboard )")


def readme_commands() -> list[str]:
    """The README's shell commands: bash blocks, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#") and not NOT_EMBER.match(line):
                commands.append(line)
    return commands


def as_settings_check(command: str) -> list[str]:
    """The command with `--print_config` (resolve the settings, run nothing); `accelerate launch` as the script."""
    argv = shlex.split(command)
    if argv[:2] == ["accelerate", "launch"]:
        argv = ["python", next(a for a in argv if a.endswith(".py")), *argv[argv.index(
            next(a for a in argv if a.endswith(".py"))) + 1:]]
    assert argv[0] == "python", command
    extra = [] if "--help" in argv else ["--print_config"]
    return [sys.executable, *argv[1:], *extra]


def test_the_readme_shows_commands_of_every_stage():
    commands = readme_commands()
    for entry in ("-m data_prep run", "-m data_prep.instructions", "recipes/pretrain.py", "recipes/finetune_lora.py",
                  "recipes/eval_perplexity.py", "recipes/eval_downstream.py", "recipes/generate.py",
                  "-m modeling.convert", "-m modeling.sizing", "-m training.hub", "-m data_prep.tasks",
                  "recipes/finetune_classifier.py"):
        assert any(entry in command for command in commands), entry


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_resolves_its_settings(command):
    result = subprocess.run(as_settings_check(command), capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    assert "error:" not in result.stderr and "deprecated" not in result.stderr, result.stderr[-2000:]
