"""Every figure the benchmarks measure, with its reference and target, for the summary and JSON.

A benchmark module's main() returns a list of Figure; `python -m benchmarks` prints them all
with their targets (met / not met) and writes them to a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass
class Figure:
    """One measured figure; `compared` is what the target applies to (value or ratio)."""

    group: str  # the benchmark module
    name: str
    value: float
    unit: str
    reference: str | None = None  # what it is measured against, in the same run
    reference_value: float | None = None
    ratio: float | None = None  # value / reference_value
    target: str | None = None  # e.g. "ratio >= 0.9", "value < 30"
    met: bool | None = None  # None: no target

    def line(self) -> str:
        text = f"{self.group:<10} {self.name:<48} {self.value:12.4g} {self.unit:<8}"
        if self.ratio is not None:
            text += f" ratio {self.ratio:6.2f}"
        if self.target is None:
            return text + "   (no target)"
        return text + f"   target {self.target}: {'met' if self.met else 'NOT met'}"


def figure(
    group: str,
    name: str,
    value: float,
    unit: str,
    reference: str | None = None,
    reference_value: float | None = None,
    target: str | None = None,
) -> Figure:
    """A Figure; `target` is "<value|ratio> <op> <bound>", checked here."""
    ratio = value / reference_value if reference_value else None
    met = None
    if target is not None:
        what, op, bound = target.split()
        subject = ratio if what == "ratio" else value
        met = subject is not None and _OPS[op](subject, float(bound))
    return Figure(group, name, value, unit, reference, reference_value, ratio, target, met)


def summary(figures: list[Figure]) -> str:
    met = sum(f.met is True for f in figures)
    missed = sum(f.met is False for f in figures)
    lines = [f.line() for f in figures]
    lines.append(f"{len(figures)} figures: {met} targets met, {missed} not met")
    return "\n".join(lines)


def write_json(figures: list[Figure], path: Path) -> None:
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "figures": [dataclasses.asdict(f) for f in figures],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
