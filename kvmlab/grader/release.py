"""The student version of an exercise: solutions stubbed, hidden checks gone, outputs cleared.

`release(exercise)` builds it in memory and then proves it leaks nothing: no marker-like text
and no hidden region's text may remain anywhere in the released notebook (outputs and metadata
included), or it raises rather than return it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from kvmlab.grader.format import (
    LOOKS_LIKE_MARKER,
    Exercise,
    FormatError,
    Region,
    cell_source,
    check_meta,
    split_regions,
)

CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()\n"
MARKDOWN_STUB = "YOUR ANSWER HERE\n"
HIDDEN_NOTE = "# (the grader also runs hidden checks here)\n"
KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def _stub(region: Region, cell_type: str) -> str:
    stub = CODE_STUB if cell_type == "code" else MARKDOWN_STUB
    return "".join(region.indent + line for line in stub.splitlines(keepends=True))


def release_source(source: str, cell_type: str, where: str) -> str:
    """One cell's source for students: solution regions stubbed, hidden regions removed."""
    parts: list[str] = []
    hidden = False
    for region in split_regions(source, where):
        if region.kind == "text":
            parts.append("".join(region.lines))
        elif region.kind == "solution":
            parts.append(_stub(region, cell_type))
        else:
            hidden = True
    text = "".join(parts)
    if hidden:
        text = text.rstrip("\n") + ("\n" if text.strip() else "") + HIDDEN_NOTE
    return text.rstrip("\n")


def release(exercise: Exercise) -> dict[str, Any]:
    """The student notebook of `exercise` (a new JSON object; the exercise is not changed)."""
    nb = exercise.notebook
    cells = []
    for index, cell in enumerate(nb["cells"]):
        where = f"{exercise.path}, cell {index}"
        out: dict[str, Any] = {
            "cell_type": cell["cell_type"],
            "metadata": {},
            "source": release_source(cell_source(cell), cell["cell_type"], where),
        }
        if "id" in cell:
            out["id"] = cell["id"]
        meta = check_meta(cell)
        if meta is not None:
            out["metadata"] = {"kvmlab": {"check": meta["check"], "points": meta["points"]}}
        if cell["cell_type"] == "code":
            out["execution_count"] = None
            out["outputs"] = []
        cells.append(out)
    metadata = {
        k: copy.deepcopy(v) for k, v in nb["metadata"].items() if k in KEPT_NOTEBOOK_METADATA
    }
    metadata["kvmlab"] = {"exercise": exercise.id, "title": exercise.title}
    student = {
        "cells": cells,
        "metadata": metadata,
        "nbformat": 4,
        "nbformat_minor": nb.get("nbformat_minor", 5),
    }
    verify_no_leak(exercise, student)
    return student


def hidden_texts(exercise: Exercise) -> list[str]:
    """The text of every hidden region of the exercise, as written in the instructor version."""
    texts = []
    for index, cell in enumerate(exercise.notebook["cells"]):
        for region in split_regions(cell_source(cell), f"{exercise.path}, cell {index}"):
            if region.kind == "hidden" and "".join(region.lines).strip():
                texts.append("".join(region.lines).strip())
    return texts


def verify_no_leak(exercise: Exercise, student: dict[str, Any]) -> None:
    """FormatError if anything marker-like or any hidden region survived into `student`."""
    dumped = json.dumps(student, ensure_ascii=False)
    sources = "\n".join(cell_source(c) for c in student["cells"])
    match = LOOKS_LIKE_MARKER.search(dumped)
    if match:
        raise FormatError(f"{exercise.id}: the release still holds a marker ({match.group(0)!r})")
    for text in hidden_texts(exercise):
        if text in sources or json.dumps(text)[1:-1] in dumped:
            raise FormatError(f"{exercise.id}: a hidden check's text survived the release")


def write_notebook(nb: dict[str, Any], path: Path) -> None:
    """Write a notebook as JupyterLab does (indent 1, a final newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def release_all(exercises: list[Exercise], out: Path) -> list[Path]:
    """Release every exercise to `out/<id>.ipynb`; all are built before any file is written."""
    built = [(exercise, release(exercise)) for exercise in exercises]
    paths = []
    for exercise, student in built:
        path = out / f"{exercise.id}.ipynb"
        write_notebook(student, path)
        paths.append(path)
    return paths
