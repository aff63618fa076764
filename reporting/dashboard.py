"""A live dashboard of a run: TensorBoard on 127.0.0.1 over the runs' `report_to: tensorboard` logs.

TensorBoard renders fully offline (its page ships inside the wheel). Each Trainer log becomes a scalar under
`train/` or `eval/`: the loss, `eval/bits_per_byte`, `tokens_per_s`, `mfu` (with a known peak), `skipped_steps`
(non-finite steps, training/callbacks.py) and `rollbacks` (loss-spike rollbacks, with `loss_spike_zscore`).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cli import ConfigError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_dashboard(logdir: str | Path, port: int = 6006, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard over `logdir` (searched recursively, so one folder holds several runs); returns the
    process and its URL once the server answers. The caller ends the process (`terminate`)."""
    try:
        import tensorboard  # noqa: F401  (the tracking extra)
    except ImportError:
        raise ConfigError("dashboard: needs TensorBoard; pip install -e '.[tracking]' (make install has it)") from None
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    log = open(logdir / "dashboard.log", "wb")  # noqa: SIM115 (held by the server process for its lifetime)
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST,
                                "--port", str(port), "--reload_interval", "5"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    url = f"http://{HOST}:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (logdir / "dashboard.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise ConfigError(f"dashboard: TensorBoard exited ({tail[0] if tail else process.returncode}); "
                              f"see {logdir / 'dashboard.log'}")
        try:
            with urllib.request.urlopen(url + "data/logdir", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise ConfigError(f"dashboard: TensorBoard did not answer on {url} within {timeout:.0f} s")
