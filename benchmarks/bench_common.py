"""Helpers every benchmark script shares: the machine it ran on and robust summaries of repeated timings."""

from __future__ import annotations

import json
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from reporting.run_report import available_cores, cpu_model_name

__all__ = ["available_cores", "cpu_model_name", "quartiles", "save_record"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def save_record(benchmark: str, results_dir: Path, output: Path | None, argv: list[str] | None, machine: dict,
                load_before: tuple[float, ...], load_after: tuple[float, ...], name: str | None = None,
                **fields: Any) -> Path:
    """Write a benchmark's JSON record (what ran, where, when, under what load, then `fields`) and say where.

    `output` defaults to `<results_dir>/<name or benchmark>_<UTC time>.json`."""
    timestamp = datetime.now(timezone.utc)
    output = output or results_dir / f"{name or benchmark}_{timestamp.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "benchmark": benchmark,
        "timestamp_utc": timestamp.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else [sys.argv[0], *argv]),
        "machine": machine,
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
        **fields,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"saved:   {output}")
    return output
