"""The gradebook: `grades.json` (everything), `grades.csv` (one row per submission, one column
per check) and `report.md` (totals, then each submission's checks with their feedback)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvmlab.grader.format import Exercise
from kvmlab.grader.grade import Submission


def _points(x: float) -> str:
    return f"{x:g}"


def write_json(submissions: list[Submission], exercises: list[Exercise], path: Path) -> None:
    data = {
        "exercises": {
            e.id: {
                "title": e.title,
                "max_score": e.max_score,
                "checks": {c.id: c.points for c in e.checks},
            }
            for e in exercises
        },
        "submissions": [s.to_json() for s in submissions],
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_csv(submissions: list[Submission], exercises: list[Exercise], path: Path) -> None:
    graded = {s.exercise for s in submissions}
    columns = [f"{e.id}/{c.id}" for e in exercises if e.id in graded for c in e.checks]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["student", "exercise", "score", "max_score", "status", "submission", *columns]
        )
        for s in submissions:
            points = {f"{s.exercise}/{c.id}": _points(c.points) for c in s.checks}
            row = [s.student, s.exercise, _points(s.score), _points(s.max_score), s.status, s.path]
            writer.writerow(row + [points.get(col, "") for col in columns])


def markdown(submissions: list[Submission], problems: list[str]) -> str:
    """The readable report: a totals table, then one section per submission."""
    lines = ["# Grades", "", "| student | exercise | score | status |", "|---|---|---|---|"]
    for s in submissions:
        score = f"{_points(s.score)} / {_points(s.max_score)}"
        lines.append(f"| {s.student} | {s.exercise} | {score} | {s.status} |")
    if problems:
        lines += ["", "## Not graded", ""] + [f"- {p}" for p in problems]
    for s in submissions:
        lines += ["", f"## {s.student}: {s.exercise}", "", f"`{s.path}`: "
                  f"{_points(s.score)} / {_points(s.max_score)} ({s.status})", ""]  # fmt: skip
        for c in s.checks:
            mark = "pass" if c.passed else "FAIL"
            line = f"- {mark} `{c.id}` {_points(c.points)}/{_points(c.max_points)}"
            lines.append(line + (f": {c.message}" if c.message else ""))
        if s.errors:
            lines += ["", "Cells of the submission that raised:", ""]
            lines += [f"- {e}" for e in s.errors]
    return "\n".join(lines) + "\n"


def write_all(
    submissions: list[Submission], exercises: list[Exercise], problems: list[str], out: Path
) -> list[Path]:
    """Write grades.json, grades.csv and report.md under `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "grades.json", out / "grades.csv", out / "report.md"]
    write_json(submissions, exercises, paths[0])
    write_csv(submissions, exercises, paths[1])
    paths[2].write_text(markdown(submissions, problems), encoding="utf-8")
    return paths
