"""Grade submissions: the student's cells as written, with the instructor's checks, in a child.

The graded program is the student's notebook, code cell by code cell, except that each check
cell (found by its `kvmlab.check` id) runs the instructor's full source, public and hidden parts,
whatever the student did to it; checks missing from the submission run at the end. The program
runs in `kvmlab.grader.runner` in its own process group, under a CPU limit, an address-space
limit and an output limit, with a wall-clock limit kept by this side; several submissions run
in parallel. Whatever ends the child, the checks that finished keep their result and the rest
score zero with the reason. Grading is deterministic: the same submission gets the same score
(PYTHONHASHSEED is fixed, and nothing in the program reads the clock for its result).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.grader.format import (
    Exercise,
    FormatError,
    cell_source,
    check_meta,
    load_notebook,
)


@dataclass(frozen=True)
class Limits:
    """What one submission may use: CPU seconds, wall seconds, memory, output."""

    cpu_seconds: float = 60.0
    memory_mib: int = 1024
    output_kib: int = 1024
    wall_seconds: float | None = None  # default: twice the CPU limit plus 10 s

    @property
    def wall(self) -> float:
        return self.wall_seconds if self.wall_seconds is not None else 2 * self.cpu_seconds + 10

    def for_exercise(self, exercise: Exercise, override: bool) -> Limits:
        """The exercise's own limits where it sets them, unless these were given explicitly."""
        if override:
            return self
        return Limits(
            cpu_seconds=exercise.cpu_seconds or self.cpu_seconds,
            memory_mib=exercise.memory_mib or self.memory_mib,
            output_kib=self.output_kib,
            wall_seconds=self.wall_seconds,
        )


@dataclass
class CheckResult:
    """One check of one submission."""

    id: str
    max_points: float
    points: float = 0.0
    passed: bool = False
    message: str = ""


@dataclass
class Submission:
    """One graded notebook: who, which exercise, per-check results, and what went wrong."""

    path: str
    student: str
    exercise: str
    checks: list[CheckResult] = field(default_factory=list)
    status: str = "graded"  # or: "time limit", "wall-clock limit", "crashed", "not gradable"
    errors: list[str] = field(default_factory=list)  # the student's cells that raised

    @property
    def score(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def max_score(self) -> float:
        return sum(c.max_points for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "submission": self.path,
            "student": self.student,
            "exercise": self.exercise,
            "score": self.score,
            "max_score": self.max_score,
            "status": self.status,
            "errors": self.errors,
            "checks": [vars(c) for c in self.checks],
        }


@dataclass(frozen=True)
class Cell:
    """A cell of the graded program: its label in feedback, its source, and its check if any."""

    label: str
    source: str
    check: str | None = None


def graded_program(exercise: Exercise, student_nb: dict[str, Any]) -> list[Cell]:
    """The student's code cells in order, each check cell replaced by the instructor's."""
    cells: list[Cell] = []
    done: set[str] = set()
    for index, cell in enumerate(student_nb.get("cells", [])):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        meta = check_meta(cell)
        check = exercise.check(str(meta.get("check"))) if meta else None
        if check is not None and check.id not in done:
            done.add(check.id)
            cells.append(Cell(f"check {check.id}", exercise.check_source(check), check.id))
        else:
            cells.append(Cell(f"cell {index}", cell_source(cell)))
    for check in exercise.checks:
        if check.id not in done:
            cells.append(Cell(f"check {check.id}", exercise.check_source(check), check.id))
    return cells


def run_program(cells: list[Cell], limits: Limits) -> tuple[list[dict[str, Any]], str]:
    """Run `cells` in a grading child; return its results lines and how it ended ("" if well)."""
    with tempfile.TemporaryDirectory(prefix="kvmlab-grade-") as tmp:
        job_path, results_path = Path(tmp, "job.json"), Path(tmp, "results.jsonl")
        work = Path(tmp, "work")
        work.mkdir()
        job = {
            "cells": [{"label": c.label, "source": c.source} for c in cells],
            "limits": {
                "cpu_seconds": limits.cpu_seconds,
                "memory_mib": limits.memory_mib,
                "output_kib": limits.output_kib,
            },
            "results": str(results_path),
        }
        job_path.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONSTARTUP", None)
        with open(Path(tmp, "output.txt"), "wb") as output:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvmlab.grader.runner", str(job_path)],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            ending = ""
            try:
                code = proc.wait(timeout=limits.wall)
            except subprocess.TimeoutExpired:
                ending = f"the wall-clock limit ({limits.wall:g} s) ran out"
                code = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
                proc.wait()
        if code is not None and code != 0:
            ending = _ending(code, limits)
            last = _tail(Path(tmp, "output.txt"))
            ending += f" (its last output: {last})" if last else ""
        lines = []
        if results_path.exists():
            for line in results_path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    lines.append(json.loads(line))
        if not ending and not any(r.get("event") == "end" for r in lines[-1:]):
            ending = "the grading process ended before the last cell"
        return lines, ending


def _tail(path: Path, size: int = 300) -> str:
    """The last line or so the child printed outside Python's streams (a C library's error)."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return " ".join(f.read().decode(errors="replace").split())


def _ending(code: int, limits: Limits) -> str:
    if code == -signal.SIGXCPU or code == -signal.SIGKILL:
        return f"the CPU time limit ({limits.cpu_seconds:g} s) ran out"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the grading process was killed by {name}"
    return f"the submission ended the grading process (exit status {code})"


def score(
    exercise: Exercise, cells: list[Cell], lines: list[dict[str, Any]], ending: str
) -> tuple[list[CheckResult], list[str], str]:
    """Per-check results from the child's results lines; the student cells' errors; status."""
    ended = {r["cell"]: r for r in lines if r.get("event") == "end"}
    started = [r["cell"] for r in lines if r.get("event") == "start"]
    running = started[-1] if started and started[-1] not in ended else None
    failed = {
        i: f"{cells[i].label}: {r['error']}"
        for i, r in sorted(ended.items())
        if r.get("error") and cells[i].check is None
    }
    results = {c.id: CheckResult(c.id, c.points) for c in exercise.checks}
    for i, cell in enumerate(cells):
        if cell.check is None:
            continue
        result = results[cell.check]
        if i in ended:
            error = ended[i].get("error")
            result.passed = error is None
            result.points = result.max_points if result.passed else 0.0
            earlier = [message for j, message in failed.items() if j < i] if error else []
            result.message = error or ""
            if earlier:
                result.message += f" [an earlier cell failed: {earlier[0]}]"
        elif running is not None and i == running:
            result.message = f"not finished: {ending} while this check ran"
        elif running is not None:
            result.message = f"not run: {ending} in {cells[running].label}"
        else:
            result.message = f"not run: {ending or 'the grading process stopped'}"
    status = "graded"
    if ending:
        status = "time limit" if "limit" in ending else "crashed"
    return [results[c.id] for c in exercise.checks], list(failed.values()), status


def identify(path: Path, exercises: dict[str, Exercise], forced: str | None) -> tuple[str, str]:
    """(student, exercise id) of a submission: --exercise, else the notebook's metadata, else
    the file name; the student is the folder name when the file is named after the exercise."""
    exercise_id = forced
    if exercise_id is None:
        meta = load_notebook(path).get("metadata", {}).get("kvmlab", {})
        exercise_id = meta.get("exercise") if isinstance(meta, dict) else None
        exercise_id = exercise_id if isinstance(exercise_id, str) else path.stem
    if exercise_id not in exercises:
        known = ", ".join(sorted(exercises))
        raise FormatError(f"{path}: which exercise? {exercise_id!r} is not one of: {known}")
    student = path.parent.name if path.stem == exercise_id else path.stem
    return student or path.stem, exercise_id


def grade_one(path: Path, exercise: Exercise, student: str, limits: Limits) -> Submission:
    """Grade one notebook file against `exercise`."""
    submission = Submission(str(path), student, exercise.id)
    try:
        nb = load_notebook(path)
    except FormatError as e:
        submission.checks = [
            CheckResult(c.id, c.points, message=f"not run: {e}") for c in exercise.checks
        ]
        submission.status = "not gradable"
        return submission
    cells = graded_program(exercise, nb)
    lines, ending = run_program(cells, limits)
    submission.checks, submission.errors, submission.status = score(exercise, cells, lines, ending)
    return submission


def expand(paths: list[Path]) -> list[Path]:
    """Notebook files: the given files, and every .ipynb under the given directories."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        else:
            found.append(p)
    return found


def grade(
    paths: list[Path],
    exercises: list[Exercise],
    *,
    exercise_id: str | None = None,
    limits: Limits | None = None,
    jobs: int | None = None,
) -> tuple[list[Submission], list[str]]:
    """Grade every notebook in `paths` (in parallel); return the submissions, in path order,
    and the problems that kept a file from being graded at all."""
    by_id = {e.id: e for e in exercises}
    override = limits is not None
    limits = limits or Limits()
    problems: list[str] = []
    tasks = []
    for path in expand(paths):
        try:
            student, eid = identify(path, by_id, exercise_id)
        except FormatError as e:
            problems.append(str(e))
            continue
        tasks.append((path, by_id[eid], student, limits.for_exercise(by_id[eid], override)))
    workers = max(1, jobs or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        submissions = list(pool.map(lambda t: grade_one(*t), tasks))
    return submissions, problems
