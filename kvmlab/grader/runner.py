"""The grading child: run a submission's cells under limits and report each cell as it ends.

`python -m kvmlab.grader.runner JOB.json` sets its own limits first (CPU seconds, address space,
file size), then runs the job's cells in order in one namespace, as a notebook kernel would,
catching every exception (SystemExit included) so one failing cell does not stop the rest. Each
cell's start and end go to the results file at once, one JSON line each, so whatever ends the
process (a CPU limit, os._exit, a crash) the parent knows which cells finished and which one
was running. Output beyond the limit raises OutputLimitError in the printing cell.
"""

from __future__ import annotations

import io
import json
import linecache
import os
import resource
import signal
import sys
import traceback
from typing import Any, TextIO

TCG_BUFFER = 32 << 20  # Unicorn reserves 1 GiB of address space per engine unless told less
TAIL = 2000  # characters of each cell's output kept for feedback
MESSAGE = 600  # characters of an exception's message kept


class OutputLimitError(Exception):
    """The submission printed more than the grader keeps."""


class CappedOutput(io.TextIOBase):
    """sys.stdout/sys.stderr for the submission: counts everything, keeps a cell's tail."""

    def __init__(self, shared: dict[str, int], limit: int) -> None:
        self.shared = shared  # stdout and stderr share one budget
        self.limit = limit
        self.tail = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.shared["written"] += len(s)
        if self.shared["written"] > self.limit:
            raise OutputLimitError(
                f"the output limit ({self.limit // 1024} KiB) is exceeded: print less"
            )
        self.tail = (self.tail + s)[-TAIL:]
        return len(s)


def apply_limits(limits: dict[str, Any]) -> None:
    """CPU seconds (SIGXCPU ends the process), address space, and the size of written files."""
    cpu = max(1, int(limits["cpu_seconds"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    # The soft limit binds the submission; the hard one is left open because kvmlab's
    # assembler worker (a child) sets its own, larger, limit for Keystone.
    memory = int(limits["memory_mib"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, resource.RLIM_INFINITY))
    files = (int(limits["output_kib"]) << 10) + (1 << 20)
    resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def cap_unicorn() -> None:
    """Give every Unicorn engine a 32 MiB translation buffer, so that RLIMIT_AS measures what
    the submission uses rather than the 1 GiB each engine would reserve."""
    try:
        import unicorn
    except ImportError:
        return
    original = unicorn.Uc.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.ctl_set_tcg_buffer_size(TCG_BUFFER)

    unicorn.Uc.__init__ = init  # type: ignore[method-assign]


def describe(e: BaseException, filename: str, limits: dict[str, Any]) -> str:
    """One paragraph for the student: the exception, and where in the cell (and below) it hit."""
    text = str(e)
    if len(text) > MESSAGE:
        text = text[:MESSAGE] + " ..."
    message = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if isinstance(e, MemoryError):
        message += f" (the memory limit is {limits['memory_mib']} MiB)"
    if isinstance(e, SyntaxError) and e.filename == filename:
        line = (e.text or "").strip()
        message = f"SyntaxError at line {e.lineno}: {e.msg}: {line}"
        if line.startswith(("%", "!")):
            message += " (the grader runs plain Python: IPython magics and ! commands are not run)"
        return message
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if f.filename == filename]
    if mine:
        message += f" (line {mine[-1].lineno}: {(mine[-1].line or '').strip()})"
    if frames and frames[-1].filename != filename:
        last = frames[-1]
        message += f" in {last.name}() at {os.path.basename(last.filename)}:{last.lineno}"
    return message


def run(job: dict[str, Any], results: TextIO) -> None:
    """Run every cell of `job` in one namespace, writing a start and an end line for each."""
    limits = job["limits"]
    shared = {"written": 0}
    out = CappedOutput(shared, int(limits["output_kib"]) << 10)
    err = CappedOutput(shared, int(limits["output_kib"]) << 10)
    sys.stdout, sys.stderr = out, err
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for index, cell in enumerate(job["cells"]):
        filename = f"<{cell['label']}>"
        source = cell["source"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        results.write(json.dumps({"event": "start", "cell": index}) + "\n")
        results.flush()
        out.tail = err.tail = ""
        error = None
        try:
            exec(compile(source, filename, "exec"), namespace)
        except BaseException as e:  # SystemExit too: the submission's, not ours
            error = describe(e, filename, limits)
        output = (out.tail + err.tail)[-TAIL:]
        results.write(json.dumps({"event": "end", "cell": index, "error": error, "output": output}))
        results.write("\n")
        results.flush()


def main(argv: list[str]) -> None:
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    apply_limits(job["limits"])
    cap_unicorn()
    results = open(job["results"], "a", encoding="utf-8")  # noqa: SIM115 (kept to the end)
    run(job, results)
    results.close()
    os._exit(0)  # threads the submission left running must not keep the process alive


if __name__ == "__main__":
    main(sys.argv)
