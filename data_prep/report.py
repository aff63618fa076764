"""Per-step accounting: documents and bytes in/out, removals by reason with file:line examples.

Every step of the pipeline owns one `StepReport`. Nothing is dropped without landing in
`removed[reason]`; the first few locations of each reason are kept so a user can open the file at
the offending line. Reports are merged across shards and printed as one table.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.io import atomic_write_text

MAX_EXAMPLES_PER_REASON = 20


class DataError(ValueError):
    """Bad input under `--strict`: the message is one line, `file:line: reason`."""


class PipelineError(RuntimeError):
    """A step cannot run yet (missing inputs) or its inputs disagree; one line, says what to do."""


@dataclass
class StepReport:
    step: str
    strict: bool = False
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    # Step-specific numbers (tokens written, PII replacements, ...).
    extra: Counter = field(default_factory=Counter)
    # Per source: "in", "out" and "removed/<reason>" document counts, for the records-read accounting.
    by_source: dict[str, Counter] = field(default_factory=dict)

    def _count(self, source: str, key: str) -> None:
        if source:
            self.by_source.setdefault(source, Counter())[key] += 1

    def seen(self, text: str, source: str = "") -> None:
        self.docs_in += 1
        self.bytes_in += len(text.encode("utf-8", "surrogatepass"))
        self._count(source, "in")

    def kept(self, text: str, source: str = "") -> None:
        self.docs_out += 1
        self.bytes_out += len(text.encode("utf-8", "surrogatepass"))
        self._count(source, "out")

    def remove(self, reason: str, where: str = "", nbytes: int = 0, *, fatal_in_strict: bool = False,
               source: str = "") -> None:
        """Count a removed document (or unreadable record). Under strict mode, bad input raises."""
        if self.strict and fatal_in_strict:
            raise DataError(f"{where}: {reason}" if where else reason)
        self.removed[reason] += 1
        self._count(source, f"removed/{reason}")
        if where:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES_PER_REASON:
                examples.append(where)

    def skip_input(self, reason: str, where: str, nbytes: int = 0, source: str = "",
                   fatal_in_strict: bool = True) -> None:
        """An input entry that could not be read (malformed, not UTF-8, binary, a broken path, ...):
        read and removed, so that records read = kept + removed."""
        if self.strict and fatal_in_strict:
            raise DataError(f"{where}: {reason}" if where else reason)
        self.docs_in += 1
        self.bytes_in += nbytes
        self._count(source, "in")
        self.remove(reason, where, source=source)

    def merge(self, other: StepReport) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.removed.update(other.removed)
        self.extra.update(other.extra)
        for source, counts in other.by_source.items():
            self.by_source.setdefault(source, Counter()).update(counts)
        for reason, where in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(where[: MAX_EXAMPLES_PER_REASON - len(mine)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "removed": dict(sorted(self.removed.items())),
            "examples": self.examples,
            "extra": dict(sorted(self.extra.items())),
            "by_source": {name: dict(sorted(counts.items())) for name, counts in sorted(self.by_source.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepReport:
        return cls(step=data["step"], docs_in=data["docs_in"], docs_out=data["docs_out"],
                   bytes_in=data["bytes_in"], bytes_out=data["bytes_out"], removed=Counter(data["removed"]),
                   examples={k: list(v) for k, v in data["examples"].items()}, extra=Counter(data["extra"]),
                   by_source={k: Counter(v) for k, v in data.get("by_source", {}).items()})


def save_reports(reports: list[StepReport], path: Path) -> None:
    atomic_write_text(path, json.dumps([r.to_dict() for r in reports], indent=2))


def load_reports(path: Path) -> list[StepReport]:
    return [StepReport.from_dict(d) for d in json.loads(Path(path).read_text(encoding="utf-8"))]


def merge_reports(groups: list[list[StepReport]]) -> list[StepReport]:
    """Merge per-shard report lists step by step, keeping the order steps first appear in."""
    merged: dict[str, StepReport] = {}
    for reports in groups:
        for report in reports:
            merged.setdefault(report.step, StepReport(report.step)).merge(report)
    return list(merged.values())


def accounting(reports: list[StepReport]) -> dict[str, dict[str, Any]]:
    """Per source and in total: records read = kept + removed, with the removals by reason over every step.

    "read" is what the first step counted in; "kept" is what the last step that tracks sources let
    through (the documents in the train and validation splits). `balanced` says whether the equation holds.
    """
    tracked = [r for r in reports if r.by_source]
    if not tracked:
        return {}
    first, last = tracked[0], tracked[-1]
    rows: dict[str, dict[str, Any]] = {}
    for source in first.by_source:
        removed: Counter = Counter()
        for report in tracked:
            for key, count in report.by_source.get(source, {}).items():
                if key.startswith("removed/"):
                    removed[key.removeprefix("removed/")] += count
        rows[source] = {"read": first.by_source[source]["in"], "kept": last.by_source.get(source, {}).get("out", 0),
                        "removed": dict(sorted(removed.items(), key=lambda kv: (-kv[1], kv[0])))}
    total: Counter = Counter()
    for row in rows.values():
        total.update(row["removed"])
    rows["total"] = {"read": sum(r["read"] for r in rows.values()), "kept": sum(r["kept"] for r in rows.values()),
                     "removed": dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))}
    for row in rows.values():
        row["balanced"] = row["read"] == row["kept"] + sum(row["removed"].values())
    return rows


def format_accounting(rows: dict[str, dict[str, Any]]) -> str:
    """`source: read = kept + removed (reason n, ...)`, one line per source and one for the total."""
    if not rows:
        return ""
    width = max(len(name) for name in rows) + 2
    lines = ["records read = kept + removed (by reason, over every step)"]
    for name, row in rows.items():
        removed = sum(row["removed"].values())
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in row["removed"].items())
        check = "" if row["balanced"] else "   <- does not add up"
        lines.append(f"  {name + ':':<{width}}{row['read']:>10,} = {row['kept']:,} + {removed:,}"
                     + (f"  ({reasons})" if reasons else "") + check)
    return "\n".join(lines)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.2f}"


def format_table(reports: list[StepReport]) -> str:
    """A plain-text table: one row per step, then one indented row per removal reason."""
    labels = [k for r in reports for k in (*r.removed, *r.extra)]
    width = max([28, *(len(k) + 6 for k in labels)])
    header = f"{'step':<{width}}{'docs in':>12}{'docs out':>12}{'MB in':>12}{'MB out':>12}"
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(f"{r.step:<{width}}{r.docs_in:>12,}{r.docs_out:>12,}{_mb(r.bytes_in):>12}{_mb(r.bytes_out):>12}")
        for reason, count in sorted(r.removed.items(), key=lambda kv: -kv[1]):
            first = r.examples.get(reason, [])
            where = f"  e.g. {first[0]}" if first else ""
            lines.append(f"  - {reason:<{width - 4}}{count:>12,}{where}")
        for key, value in sorted(r.extra.items()):
            lines.append(f"  · {key:<{width - 4}}{value:>12,}")
    summary = format_accounting(accounting(reports))
    return "\n".join(lines + (["", summary] if summary else []))
