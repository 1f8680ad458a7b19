"""Graded exercises: the exercise format, student releases, and grading in limited processes.

    kvmlab exercises release --out release/     # student notebooks, solutions and hidden checks out
    kvmlab grade submissions/ --out grades/     # per-check points, gradebook (CSV, JSON), report

`format` reads an exercise (an instructor notebook with nbgrader's markers), `release` makes the
student version, `grade` runs a submission in a child process (`runner`) under CPU, memory and
output limits, and `report` writes the gradebook. Nothing else in kvmlab imports this package.
"""
