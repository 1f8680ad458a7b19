"""The exercise format: an instructor notebook whose regions use nbgrader's markers.

An exercise is a directory `exercises/<id>/` holding `exercise.ipynb`, the instructor version:

- *solution regions*, in any code cell that is not a check, between `### BEGIN SOLUTION` and
  `### END SOLUTION` lines (each marker alone on its line, at any indentation); the release
  replaces each with a stub that raises `NotImplementedError` at the marker's indentation (in a
  markdown cell, with "YOUR ANSWER HERE");
- *check cells*: code cells whose metadata is `{"kvmlab": {"check": "<id>", "points": <n>}}`.
  What a check cell shows is its public part, which students run in the notebook; a
  `### BEGIN HIDDEN TESTS` ... `### END HIDDEN TESTS` region in it is the hidden part, removed
  from the release and run by the grader. A check earns its points when its whole cell, public
  and hidden parts, runs without an exception.

The notebook's metadata may set `{"kvmlab": {"title": ..., "cpu_seconds": ..., "memory_mib":
...}}`. Anything that looks like a marker but is not exactly one (`###BEGIN SOLUTION`, a
lower-case or trailing marker, code on the marker's line), an unclosed or unopened region, a
nested one, or a region in the wrong kind of cell is a `FormatError`: a malformed marker must
stop a release, never leak what it was meant to hide.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
MARKERS = {BEGIN_SOLUTION: "solution", BEGIN_HIDDEN: "hidden"}
ENDS = {"solution": END_SOLUTION, "hidden": END_HIDDEN}
# Anything a human could have meant as a marker: checked against the exact forms above.
LOOKS_LIKE_MARKER = re.compile(r"#+\s*(BEGIN|END)\s*(SOLUTION|HIDDEN(\s*TESTS?)?)", re.IGNORECASE)
CHECK_ID = re.compile(r"[a-z0-9][a-z0-9-]*")
NOTEBOOK = "exercise.ipynb"


class FormatError(ValueError):
    """An exercise that cannot be released or graded safely, with where and why."""


@dataclass(frozen=True)
class Region:
    """A run of a cell's lines: plain text ("text"), a "solution" or a "hidden" region.

    For a region, `lines` are the lines between its markers and `indent` is the whitespace
    before its BEGIN marker.
    """

    kind: str
    lines: tuple[str, ...]
    indent: str = ""


@dataclass(frozen=True)
class Check:
    """A graded check: its cell, its points, and whether it has a hidden part."""

    id: str
    points: float
    cell: int
    hidden: bool


@dataclass(frozen=True)
class Exercise:
    """An instructor notebook and what the grader needs to know about it."""

    id: str
    path: Path
    notebook: dict[str, Any]
    title: str
    checks: tuple[Check, ...]
    cpu_seconds: float | None
    memory_mib: int | None

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.checks)

    def check(self, check_id: str) -> Check | None:
        return next((c for c in self.checks if c.id == check_id), None)

    def check_source(self, check: Check) -> str:
        """The full source of a check cell: public and hidden parts, without the markers."""
        regions = split_regions(cell_source(self.notebook["cells"][check.cell]), "")
        return "".join(line for r in regions for line in r.lines)


def cell_source(cell: dict[str, Any]) -> str:
    """A cell's source as one string (nbformat stores either a string or a list of lines)."""
    source = cell.get("source", "")
    return source if isinstance(source, str) else "".join(source)


def check_meta(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The `kvmlab` metadata of a check cell, or None for any other cell."""
    meta = cell.get("metadata", {}).get("kvmlab")
    if cell.get("cell_type") == "code" and isinstance(meta, dict) and "check" in meta:
        return meta
    return None


def split_regions(source: str, where: str) -> list[Region]:
    """Cut `source` into text and marked regions; FormatError (naming `where`) if the markers
    are malformed, nested or unbalanced."""
    regions: list[Region] = []
    text: list[str] = []
    open_kind: str | None = None
    open_line = 0
    indent = ""
    body: list[str] = []
    for number, line in enumerate(source.splitlines(keepends=True), 1):
        stripped = line.strip()
        exact_begin = MARKERS.get(stripped)
        exact_end = stripped in ENDS.values()
        if not exact_begin and not exact_end and LOOKS_LIKE_MARKER.search(line):
            raise FormatError(
                f"{where}, line {number}: {stripped!r} looks like a marker but is not one of "
                f"{', '.join(repr(m) for m in (*MARKERS, *ENDS.values()))}, alone on its line"
            )
        if exact_begin:
            if open_kind is not None:
                raise FormatError(
                    f"{where}, line {number}: {stripped!r} inside the {open_kind} region opened "
                    f"at line {open_line}: regions do not nest"
                )
            if text:
                regions.append(Region("text", tuple(text)))
                text = []
            open_kind, open_line, body = exact_begin, number, []
            indent = line[: len(line) - len(line.lstrip())]
        elif exact_end:
            if open_kind is None or stripped != ENDS[open_kind]:
                opened = f"the {open_kind} region opened at line {open_line}" if open_kind else ""
                raise FormatError(
                    f"{where}, line {number}: {stripped!r} without its BEGIN marker"
                    + (f" (inside {opened})" if opened else "")
                )
            regions.append(Region(open_kind, tuple(body), indent))
            open_kind = None
        elif open_kind is not None:
            body.append(line)
        else:
            text.append(line)
    if open_kind is not None:
        raise FormatError(
            f"{where}, line {open_line}: the {open_kind} region is never closed with "
            f"{ENDS[open_kind]!r}"
        )
    if text:
        regions.append(Region("text", tuple(text)))
    return regions


def load_notebook(path: Path) -> dict[str, Any]:
    """A notebook file as JSON, checked to be nbformat 4; FormatError otherwise."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a readable notebook ({e})") from None
    if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
        raise FormatError(f"{path}: not an nbformat 4 notebook")
    return nb


def load_exercise(directory: Path) -> Exercise:
    """Read and validate `directory/exercise.ipynb`; the exercise's id is the directory's name."""
    path = directory / NOTEBOOK
    nb = load_notebook(path)
    checks: list[Check] = []
    for index, cell in enumerate(nb["cells"]):
        where = f"{path}, cell {index}"
        regions = split_regions(cell_source(cell), where)
        kinds = {r.kind for r in regions}
        meta = check_meta(cell)
        if meta is None:
            if "hidden" in kinds:
                raise FormatError(f"{where}: hidden tests belong in a check cell")
            continue
        check_id, points = meta.get("check"), meta.get("points")
        if not isinstance(check_id, str) or not CHECK_ID.fullmatch(check_id):
            raise FormatError(f"{where}: check id {check_id!r} is not lower-case-with-dashes")
        if isinstance(points, bool) or not isinstance(points, int | float) or points <= 0:
            raise FormatError(f"{where}: check {check_id!r} needs positive points, not {points!r}")
        if any(c.id == check_id for c in checks):
            raise FormatError(f"{where}: check id {check_id!r} is used twice")
        if "solution" in kinds:
            raise FormatError(f"{where}: a check cell cannot hold a solution region")
        checks.append(Check(check_id, float(points), index, "hidden" in kinds))
    if not checks:
        raise FormatError(f"{path}: an exercise needs at least one check cell")
    meta = nb.get("metadata", {}).get("kvmlab", {})
    return Exercise(
        id=directory.name,
        path=path,
        notebook=nb,
        title=str(meta.get("title", directory.name)),
        checks=tuple(checks),
        cpu_seconds=meta.get("cpu_seconds"),
        memory_mib=meta.get("memory_mib"),
    )


def default_exercises_dir() -> Path:
    """`./exercises` when there is one, else the exercises kvmlab ships next to its package."""
    here = Path("exercises")
    if (here).is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "exercises"


def find_exercises(root: Path) -> list[Exercise]:
    """Every exercise under `root` (a directory holding exercise.ipynb), sorted by id."""
    if not root.is_dir():
        raise FormatError(f"{root}: no exercises directory")
    return [load_exercise(d) for d in sorted(root.iterdir()) if (d / NOTEBOOK).is_file()]
