"""The exercise format and the release: markers are exact, and nothing hidden gets out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmlab.grader.format import FormatError, find_exercises, load_exercise, split_regions
from kvmlab.grader.release import release, release_all, release_source

EXERCISES = Path(__file__).resolve().parents[2] / "exercises"


def notebook(tmp_path: Path, cells: list[tuple[str, str, dict]]) -> Path:
    """An exercise directory whose notebook has `cells` as (type, source, cell metadata)."""
    nb = {
        "cells": [
            {"cell_type": t, "metadata": m, "source": s}
            | ({"outputs": [], "execution_count": None} if t == "code" else {})
            for t, s, m in cells
        ],
        "metadata": {"kernelspec": {"name": "python3"}, "kvmlab": {"title": "toy"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    directory = tmp_path / "toy"
    directory.mkdir(exist_ok=True)
    (directory / "exercise.ipynb").write_text(json.dumps(nb))
    return directory


def check(id_: str, points: int = 1) -> dict:
    return {"kvmlab": {"check": id_, "points": points}}


def test_every_shipped_exercise_loads_with_checks_and_hidden_checks() -> None:
    exercises = find_exercises(EXERCISES)
    assert len(exercises) >= 8
    for exercise in exercises:
        assert exercise.checks and exercise.max_score > 0, exercise.id
        assert any(c.hidden for c in exercise.checks), f"{exercise.id} has no hidden check"


def test_releases_hold_no_hidden_check_no_solution_and_no_marker() -> None:
    for exercise in find_exercises(EXERCISES):
        student = release(exercise)
        text = json.dumps(student)
        assert "BEGIN" not in text and "END HIDDEN" not in text and "END SOLUTION" not in text
        sources = "\n".join(c["source"] for c in student["cells"])
        cells = ["".join(c["source"]) for c in exercise.notebook["cells"]]
        regions = [r for i, c in enumerate(cells) for r in split_regions(c, f"cell {i}")]
        shown = "".join("".join(r.lines) for r in regions if r.kind != "hidden")
        hidden = [line.strip() for r in regions if r.kind == "hidden" for line in r.lines]
        for line in hidden:  # every hidden line that is not also said elsewhere is gone
            if len(line) > 20 and line not in shown:
                assert line not in sources, (exercise.id, line)
        assert all(not c.get("outputs") for c in student["cells"])
        assert student["metadata"]["kvmlab"]["exercise"] == exercise.id


def test_solution_becomes_a_stub_at_the_markers_indentation() -> None:
    source = "def f():\n    x = 1\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"
    out = release_source(source, "code", "t")
    assert out == "def f():\n    x = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    tabbed = "if True:\n\t### BEGIN SOLUTION\n\tpass\n\t### END SOLUTION\n"
    assert release_source(tabbed, "code", "t").endswith("\n\traise NotImplementedError()")
    assert release_source("### BEGIN SOLUTION\n42\n### END SOLUTION", "markdown", "t") == (
        "YOUR ANSWER HERE"
    )


def test_hidden_region_with_odd_indentation_is_removed() -> None:
    source = "assert 1\n        ### BEGIN HIDDEN TESTS\nassert secret()\n  ### END HIDDEN TESTS\n"
    out = release_source(source, "code", "t")
    assert "secret" not in out and out.startswith("assert 1\n")


@pytest.mark.parametrize(
    "source",
    [
        "### BEGIN HIDDEN TESTS\nassert secret()\n",  # never closed
        "assert secret()\n### END HIDDEN TESTS\n",  # never opened
        "### BEGIN HIDDEN TESTS\n### BEGIN HIDDEN TESTS\nsecret\n### END HIDDEN TESTS\n",
        "### BEGIN HIDDEN TESTS\nsecret\n### END SOLUTION\n",  # the wrong END
        "###BEGIN HIDDEN TESTS\nsecret\n###END HIDDEN TESTS\n",  # near misses...
        "### begin hidden tests\nsecret\n### end hidden tests\n",
        "## BEGIN HIDDEN TESTS\nsecret\n## END HIDDEN TESTS\n",
        "### BEGIN HIDDEN TEST\nsecret\n### END HIDDEN TEST\n",
        "x = 1  ### BEGIN HIDDEN TESTS\nsecret\n### END HIDDEN TESTS\n",
        "### BEGIN HIDDEN TESTS\nsecret\n### END HIDDEN TESTS  # done\n",
    ],
)
def test_a_malformed_marker_is_an_error_never_a_leak(tmp_path: Path, source: str) -> None:
    with pytest.raises(FormatError):
        release_source(source, "code", "t")
    directory = notebook(tmp_path, [("code", "x = 1", {}), ("code", source, check("c"))])
    with pytest.raises(FormatError):
        release(load_exercise(directory))


def test_hidden_checks_belong_in_check_cells_and_solutions_outside(tmp_path: Path) -> None:
    hidden = "### BEGIN HIDDEN TESTS\nsecret\n### END HIDDEN TESTS"
    directory = notebook(tmp_path, [("code", hidden, {}), ("code", "assert 1", check("c"))])
    with pytest.raises(FormatError, match="check cell"):
        load_exercise(directory)
    solution = "### BEGIN SOLUTION\nx = 1\n### END SOLUTION"
    directory = notebook(tmp_path, [("code", solution, check("c"))])
    with pytest.raises(FormatError, match="solution"):
        load_exercise(directory)


@pytest.mark.parametrize(
    "meta", [check("Bad Id"), check("c", 0), {"kvmlab": {"check": "c", "points": "2"}}]
)
def test_check_metadata_is_validated(tmp_path: Path, meta: dict) -> None:
    with pytest.raises(FormatError):
        load_exercise(notebook(tmp_path, [("code", "assert 1", meta)]))


def test_release_clears_outputs_that_could_show_hidden_results(tmp_path: Path) -> None:
    directory = notebook(
        tmp_path,
        [
            (
                "code",
                "assert 1\n### BEGIN HIDDEN TESTS\nassert secret()\n### END HIDDEN TESTS",
                check("c"),
            )
        ],
    )
    path = directory / "exercise.ipynb"
    nb = json.loads(path.read_text())
    nb["cells"][0]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "secret()"}]
    nb["cells"][0]["metadata"]["secret"] = "assert secret()"
    path.write_text(json.dumps(nb))
    student = release(load_exercise(directory))
    assert "secret" not in json.dumps(student)
    assert student["cells"][0]["metadata"] == check("c")


def test_release_all_writes_one_notebook_per_exercise(tmp_path: Path) -> None:
    exercises = find_exercises(EXERCISES)
    paths = release_all(exercises, tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(f"{e.id}.ipynb" for e in exercises)
    assert all(json.loads(p.read_text())["nbformat"] == 4 for p in paths)
