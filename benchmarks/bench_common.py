"""Helpers every benchmark script shares: the machine it ran on and robust summaries of repeated timings."""

from __future__ import annotations

import statistics

from modeling.run_report import available_cores, cpu_model_name

__all__ = ["available_cores", "cpu_model_name", "quartiles"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3
