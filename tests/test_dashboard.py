"""Watching a run live: a short pretraining run logs to TensorBoard (`report_to: tensorboard`), Ember's dashboard
serves it on 127.0.0.1, and a real headless browser (Debian's chromium) renders a chart of each of Ember's own
series whose last point is the run's last logged value: loss, eval bits per byte, tokens/s, MFU, skipped
steps and rollbacks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import debian_program

from reporting.dashboard import free_port, start_dashboard

REPO_ROOT = Path(__file__).resolve().parents[1]
# TensorBoard tag -> the key of the same series in trainer_state.json's log history.
SERIES = {"train/loss": "loss", "eval/bits_per_byte": "eval_bits_per_byte", "train/tokens_per_s": "tokens_per_s",
          "train/mfu": "mfu", "train/skipped_steps": "skipped_steps", "train/rollbacks": "rollbacks"}


@pytest.fixture(scope="module")
def chromium() -> str:
    return debian_program("chromium", "browser-deps", "run the dashboard test")


def rendered_cards(chromium: str, url: str, tmp_path: Path) -> dict[str, str]:
    """The time-series page as the browser rendered it: each scalar card's title -> its visible text."""
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,20000",
                             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000", "--dump-dom",
                             f"{url}#timeseries"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    cards = {}
    for card in re.findall(r"<scalar-card.*?</scalar-card>", result.stdout, flags=re.S):
        assert "<canvas" in card  # the chart itself
        text = " ".join(re.sub(r"<[^>]+>", " ", card).split())
        group, name = text.split()[:2]  # the title: "train /loss"
        cards[group + name] = text
    return cards


def test_the_dashboard_draws_embers_series_in_a_browser(data_dir, tmp_path, chromium):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "pretrain.py"), "--config",
         str(REPO_ROOT / "recipes" / "configs" / "pretrain_nano_cpu.yaml"), f"--data_dir={data_dir}",
         f"--output_dir={out}", "--max_steps=12", "--warmup_steps=2", "--logging_steps=2", "--eval_steps=4",
         "--save_steps=4", "--per_device_train_batch_size=2", "--gradient_accumulation_steps=1",
         "--model_overrides={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
         "num_key_value_heads: 1}", "--report_to=tensorboard", "--peak_flops=1e11", "--loss_spike_zscore=50",
         "--loss_spike_window=4"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]

    server, url = start_dashboard(out, free_port())
    try:
        assert url.startswith("http://127.0.0.1:")
        cards = rendered_cards(chromium, url, tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for tag, key in SERIES.items():
        assert tag in cards, sorted(cards)
        last_step, last_value = [(entry["step"], entry[key]) for entry in history if key in entry][-1]
        # The card's data table: run, smoothed, value, step of the last point.
        match = re.search(r"Relative \S+ (\S+) (\S+) (\d+)", cards[tag])
        assert match, cards[tag][:300]
        shown, step = float(match[2].replace(",", "")), int(match[3])
        assert step == last_step and shown == pytest.approx(last_value, abs=1e-4, rel=1e-4), (tag, match.groups())
