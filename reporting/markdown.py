"""Markdown and number formatting shared by Ember's reports (run report, model card, quickstart report)."""

from __future__ import annotations

import json
import math
from typing import Any

from modeling.sizing import format_duration


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def fmt_number(value: Any, spec: str) -> str:
    if not is_number(value):
        return str(value)
    return format(value, spec) if math.isfinite(value) else str(float(value))  # "nan", "inf"


def fmt_duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{format_duration(seconds)} ({seconds:,.0f} s)"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
