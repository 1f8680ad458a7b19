"""`kvmlab exercises list|release` and `kvmlab grade`: the instructor's commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvmlab.grader.format import FormatError, default_exercises_dir, find_exercises
from kvmlab.grader.grade import Limits, grade
from kvmlab.grader.release import release_all
from kvmlab.grader.report import write_all


def add_commands(sub: Any) -> None:
    """Add the `exercises` and `grade` subcommands to kvmlab's subparsers `sub`."""
    ex = sub.add_parser("exercises", help="list the graded exercises or release student versions")
    ex.add_argument("action", choices=("list", "release"))
    ex.add_argument("ids", nargs="*", help="exercise ids (default: all)")
    ex.add_argument("--dir", type=Path, help="the exercises directory (default: exercises/)")
    ex.add_argument("--out", type=Path, default=Path("release"), help="where releases go")
    ex.set_defaults(handler=exercises_command)
    gr = sub.add_parser("grade", help="grade submitted notebooks; write the gradebook and report")
    gr.add_argument("submissions", nargs="+", type=Path, help="notebooks, or folders of them")
    gr.add_argument("--exercise", help="grade every submission as this exercise")
    gr.add_argument("--dir", type=Path, help="the exercises directory (default: exercises/)")
    gr.add_argument("--out", type=Path, default=Path("grades"), help="where the gradebook goes")
    gr.add_argument("--jobs", type=int, help="submissions graded at once (default: CPU count)")
    gr.add_argument("--cpu-seconds", type=float, help="CPU limit per submission")
    gr.add_argument("--memory-mib", type=int, help="address-space limit per submission")
    gr.set_defaults(handler=grade_command)


def _exercises(args: argparse.Namespace) -> list[Any]:
    exercises = find_exercises(args.dir or default_exercises_dir())
    wanted = getattr(args, "ids", None)
    if wanted:
        unknown = set(wanted) - {e.id for e in exercises}
        if unknown:
            raise FormatError(f"unknown exercise(s): {', '.join(sorted(unknown))}")
        exercises = [e for e in exercises if e.id in wanted]
    return exercises


def exercises_command(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        exercises = _exercises(args)
        if args.action == "list":
            for e in exercises:
                checks = ", ".join(f"{c.id} ({c.points:g})" for c in e.checks)
                out.write(f"{e.id}: {e.title} [{e.max_score:g} points: {checks}]\n")
            return 0
        for path in release_all(exercises, args.out):
            out.write(f"released {path}\n")
    except FormatError as e:
        out.write(f"kvmlab: {e}\n")
        return 1
    return 0


def grade_command(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        exercises = _exercises(args)
    except FormatError as e:
        out.write(f"kvmlab: {e}\n")
        return 1
    limits = None
    if args.cpu_seconds or args.memory_mib:
        default = Limits()
        limits = Limits(
            cpu_seconds=args.cpu_seconds or default.cpu_seconds,
            memory_mib=args.memory_mib or default.memory_mib,
        )
    submissions, problems = grade(
        args.submissions, exercises, exercise_id=args.exercise, limits=limits, jobs=args.jobs
    )
    for s in submissions:
        out.write(f"{s.student:20} {s.exercise:24} {s.score:g}/{s.max_score:g}  {s.status}\n")
    for p in problems:
        out.write(f"kvmlab: not graded: {p}\n")
    for path in write_all(submissions, exercises, problems, args.out):
        out.write(f"wrote {path}\n")
    return 1 if problems or not submissions else 0
