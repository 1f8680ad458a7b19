"""Grading: solutions score full marks, starters less, and hostile submissions cannot hurt.

The shipped exercises are graded once per module (instructor and released versions, in
parallel); the hostile cases use a tiny exercise of their own and short limits.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from kvmlab.cli import main
from kvmlab.grader.format import Exercise, find_exercises, load_exercise
from kvmlab.grader.grade import Limits, grade
from kvmlab.grader.release import release, write_notebook

EXERCISES = Path(__file__).resolve().parents[2] / "exercises"
TOY = {
    "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "Write `add`."},
        {
            "cell_type": "code",
            "metadata": {},
            "outputs": [],
            "execution_count": None,
            "source": "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n"
            "    ### END SOLUTION",
        },
        {
            "cell_type": "code",
            "metadata": {"kvmlab": {"check": "small", "points": 1}},
            "outputs": [],
            "execution_count": None,
            "source": "assert add(1, 2) == 3",
        },
        {
            "cell_type": "code",
            "metadata": {"kvmlab": {"check": "large", "points": 2}},
            "outputs": [],
            "execution_count": None,
            "source": "assert add(2, 2) == 4\n### BEGIN HIDDEN TESTS\n"
            "assert add(10**20, 1) == 10**20 + 1, 'big numbers'\n### END HIDDEN TESTS",
        },
    ],
    "metadata": {"kvmlab": {"title": "toy"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}
FAST = Limits(cpu_seconds=2, memory_mib=256, output_kib=64, wall_seconds=6)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Exercise], dict]:
    """Every shipped exercise graded as its instructor version and as its release."""
    exercises = find_exercises(EXERCISES)
    root = tmp_path_factory.mktemp("shipped")
    for e in exercises:
        write_notebook(e.notebook, root / "instructor" / f"{e.id}.ipynb")
        write_notebook(release(e), root / "starter" / f"{e.id}.ipynb")
    submissions, problems = grade([root], exercises)
    assert not problems
    return exercises, {(s.student, s.exercise): s for s in submissions}


def test_every_instructor_solution_scores_full_marks(shipped: tuple) -> None:
    exercises, graded = shipped
    for e in exercises:
        s = graded["instructor", e.id]
        failed = {c.id: c.message for c in s.checks if not c.passed}
        assert s.score == s.max_score == e.max_score, f"{e.id}: {failed}"
        assert s.status == "graded" and not s.errors


def test_every_starter_scores_below_full_marks_with_feedback(shipped: tuple) -> None:
    exercises, graded = shipped
    for e in exercises:
        s = graded["starter", e.id]
        assert s.status == "graded", f"{e.id}: {s.status}"
        assert s.score < s.max_score, e.id
        failed = [c for c in s.checks if not c.passed]
        assert all("NotImplementedError" in c.message for c in failed), e.id


@pytest.fixture()
def toy(tmp_path: Path) -> Exercise:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "exercise.ipynb").write_text(json.dumps(TOY))
    return load_exercise(tmp_path / "toy")


def submit(tmp_path: Path, toy: Exercise, solution: str, name: str = "student") -> Path:
    """The toy's release with `solution` as the student's code."""
    nb = release(toy)
    nb["cells"][1]["source"] = solution
    path = tmp_path / "submissions" / f"{name}.ipynb"
    write_notebook(nb, path)
    return path


def grade_toy(tmp_path: Path, toy: Exercise, solution: str, limits: Limits = FAST) -> dict:
    path = submit(tmp_path, toy, solution)
    start = time.monotonic()
    [s], problems = grade([path], [toy], exercise_id="toy", limits=limits)
    assert not problems
    assert time.monotonic() - start < limits.wall + 5
    return {"score": s.score, "status": s.status, "errors": s.errors} | {
        c.id: c.message for c in s.checks
    }


def test_a_correct_submission_scores_all_and_a_wrong_one_gets_the_hidden_message(
    tmp_path: Path, toy: Exercise
) -> None:
    assert grade_toy(tmp_path, toy, "def add(a, b):\n    return a + b")["score"] == 3
    wrong = grade_toy(tmp_path, toy, "def add(a, b):\n    return (a + b) % 2**64")
    assert wrong["score"] == 1 and "big numbers" in wrong["large"]


def test_tampered_checks_still_run_the_instructors_source(tmp_path: Path, toy: Exercise) -> None:
    nb = release(toy)
    nb["cells"][1]["source"] = "def add(a, b):\n    return 0"
    nb["cells"][2]["source"] = "pass  # the student emptied the check"
    del nb["cells"][3]  # and deleted the other one
    path = tmp_path / "tampered.ipynb"
    write_notebook(nb, path)
    [s], _ = grade([path], [toy], exercise_id="toy", limits=FAST)
    assert s.score == 0 and [c.id for c in s.checks] == ["small", "large"]


def test_an_infinite_loop_hits_the_cpu_limit(tmp_path: Path, toy: Exercise) -> None:
    loop = "def add(a, b):\n    return a + b\nwhile True:\n    pass"
    r = grade_toy(tmp_path, toy, loop, Limits(cpu_seconds=2, wall_seconds=30))  # a busy host
    assert r["score"] == 0 and r["status"] == "time limit"
    assert "CPU time limit (2 s)" in r["small"] and "cell 1" in r["small"]


def test_a_sleeping_submission_hits_the_wall_clock_limit(tmp_path: Path, toy: Exercise) -> None:
    r = grade_toy(tmp_path, toy, "def add(a, b):\n    return a + b\nimport time\ntime.sleep(60)")
    assert r["score"] == 0 and "wall-clock limit (6 s)" in r["small"]


def test_os_exit_ends_only_the_child(tmp_path: Path, toy: Exercise) -> None:
    r = grade_toy(tmp_path, toy, "import os\nos._exit(3)")
    assert r["score"] == 0 and r["status"] == "crashed"
    assert "ended the grading process (exit status 3)" in r["small"]


def test_huge_output_is_cut_with_a_message(tmp_path: Path, toy: Exercise) -> None:
    r = grade_toy(tmp_path, toy, "def add(a, b):\n    print('x' * 10**7)\n    return a + b")
    assert r["score"] == 0 and "output limit (64 KiB)" in r["small"]
    below_python = "import os\nfor _ in range(20):\n    os.write(1, b'y' * 10**6)\nadd = max"
    fd_level = grade_toy(tmp_path, toy, below_python)
    assert "File too large" in fd_level["errors"][0]


def test_a_memory_hog_gets_memory_error(tmp_path: Path, toy: Exercise) -> None:
    r = grade_toy(tmp_path, toy, "def add(a, b):\n    return a + b\nhog = bytearray(2 << 30)")
    assert r["score"] == 3, "the failing cell is reported, the checks still run"
    assert "MemoryError" in r["errors"][0] and "memory limit is 256 MiB" in r["errors"][0]


def test_an_odd_import_or_sys_exit_is_a_cell_error(tmp_path: Path, toy: Exercise) -> None:
    r = grade_toy(tmp_path, toy, "import no_such_module_for_kvmlab\ndef add(a, b):\n    return 1")
    assert r["score"] == 0 and "ModuleNotFoundError" in r["errors"][0]
    assert "an earlier cell failed" in r["small"] and "NameError" in r["small"]
    r = grade_toy(tmp_path, toy, "import sys\nsys.exit(4)")
    assert "SystemExit: 4" in r["errors"][0] and r["status"] == "graded"
    r = grade_toy(tmp_path, toy, "%time x = 1")
    assert "magics" in r["errors"][0]


def test_grading_is_deterministic(tmp_path: Path, toy: Exercise) -> None:
    solution = "import random\ndef add(a, b):\n    return a + b + (hash('k') % 2 and 0)"
    first = grade_toy(tmp_path, toy, solution)
    assert grade_toy(tmp_path, toy, solution) == first


def test_cli_releases_and_grades_with_a_gradebook(
    tmp_path: Path, toy: Exercise, capsys: pytest.CaptureFixture[str]
) -> None:
    root = toy.path.parents[1]
    assert main(["exercises", "release", "--dir", str(root), "--out", str(tmp_path / "rel")]) == 0
    released = tmp_path / "rel" / "toy.ipynb"
    nb = json.loads(released.read_text())
    nb["cells"][1]["source"] = "def add(a, b):\n    return a + b"
    write_notebook(nb, tmp_path / "subs" / "alice" / "toy.ipynb")
    write_notebook(json.loads(released.read_text()), tmp_path / "subs" / "bob" / "toy.ipynb")
    out = tmp_path / "grades"
    code = main(["grade", str(tmp_path / "subs"), "--dir", str(root), "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "grades.csv").open()))
    assert [(r["student"], r["score"], r["toy/large"]) for r in rows] == [
        ("alice", "3", "2"),
        ("bob", "0", "0"),
    ]
    book = json.loads((out / "grades.json").read_text())
    assert book["exercises"]["toy"]["max_score"] == 3
    assert "NotImplementedError" in book["submissions"][1]["checks"][0]["message"]
    report = (out / "report.md").read_text()
    assert "| alice | toy | 3 / 3 | graded |" in report
    assert main(["exercises", "list", "--dir", str(root)]) == 0
    assert "toy: toy [3 points: small (1), large (2)]" in capsys.readouterr().out
