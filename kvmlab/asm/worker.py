"""Keystone in a child process, because some sources hang it (`[bits 32]`) or crash it (`.text`).

One worker is started on first use and reused (starting one costs ~60 ms, a call ~0.1 ms). A
request is a list of sources; the worker answers each as soon as it is assembled, so when it
hangs or dies the caller knows which source did it. It is then killed and replaced.

Run as a script, this file is the worker: JSON requests on stdin, one JSON reply per source.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

TIMEOUT = -1  # Outcome.errno when Keystone did not answer in time
CRASHED = -2  # Outcome.errno when the worker died (a segfault, or out of memory)
_MEMORY_LIMIT = 2 << 30  # a runaway `.fill` or `.rept` cannot take all the memory


@dataclass(frozen=True)
class Outcome:
    """Keystone's answer to one source: its bytes, or an error number and message."""

    code: bytes | None
    errno: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        """Bytes came back. Empty bytes count as a failure: kvmlab's sources never assemble to
        nothing, so nothing means Keystone dropped them silently."""
        return bool(self.code)


class Worker:
    """The client side: one Keystone process, reused across calls, replaced when it fails."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = 0  # the pid that started _proc: a forked child must start its own
        self._buffer = b""
        self._lock = threading.Lock()

    def run(
        self,
        arch: str,
        mode: str,
        base: int,
        sources: list[str],
        *,
        timeout: float,
        stop_on_error: bool = False,
    ) -> list[Outcome]:
        """Assemble each source at `base`; each must answer within `timeout` seconds.

        The list ends early at a timeout or crash (the last outcome says which), and with
        `stop_on_error` at the first failure.
        """
        request = {
            "arch": arch,
            "mode": mode,
            "base": base,
            "sources": sources,
            "stop": stop_on_error,
        }
        with self._lock:
            try:
                proc = self._send(json.dumps(request).encode() + b"\n")
                outcomes: list[Outcome] = []
                for _ in sources:
                    outcome = self._receive(proc, timeout)
                    outcomes.append(outcome)
                    if outcome.errno in (TIMEOUT, CRASHED):
                        self._stop()
                        break
                    if stop_on_error and not outcome.ok:
                        break
                return outcomes
            except BaseException:  # e.g. KeyboardInterrupt: replies may be left in the pipe
                self._stop()
                raise

    def _send(self, request: bytes) -> subprocess.Popen[bytes]:
        """Write a request to a live worker, starting one if needed or if the last one died."""
        try:
            return self._write(request)
        except BrokenPipeError:
            self._stop()
            return self._write(request)

    def _write(self, request: bytes) -> subprocess.Popen[bytes]:
        proc = self._started()
        assert proc.stdin is not None
        proc.stdin.write(request)
        proc.stdin.flush()
        return proc

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._owner != os.getpid():
            self._proc = subprocess.Popen(
                [sys.executable, "-I", __file__],  # -I: this folder is not put on sys.path
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # LLVM prints some errors there itself
                start_new_session=True,  # Ctrl-C in a notebook interrupts the caller, not Keystone
            )
            self._owner = os.getpid()
            self._buffer = b""
        return self._proc

    def _receive(self, proc: subprocess.Popen[bytes], timeout: float) -> Outcome:
        """Read one reply line, or report a timeout or a dead worker."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return Outcome(None, TIMEOUT, f"Keystone did not finish within {timeout:g} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return Outcome(None, CRASHED, "Keystone crashed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "code" in reply:
            return Outcome(bytes.fromhex(reply["code"]))
        return Outcome(None, reply["errno"], reply["message"])

    def _stop(self) -> None:
        """Kill the worker if this process started it; the next call starts a fresh one."""
        proc, self._proc = self._proc, None
        if proc is not None and self._owner == os.getpid():
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(BrokenPipeError):  # unsent bytes of a dead worker
                        pipe.close()

    def close(self) -> None:
        """Stop the worker (at interpreter exit)."""
        with self._lock:
            self._stop()


WORKER = Worker()
atexit.register(WORKER.close)


def _serve(requests: IO[str], replies: IO[str]) -> None:
    """The worker's loop: assemble each source of each request, answering one by one."""
    import keystone

    engines: dict[tuple[str, str], Any] = {}
    for request in requests:
        job = json.loads(request)
        key = (job["arch"], job["mode"])
        if key not in engines:
            if job["arch"] == "arm64":
                engines[key] = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN)
            else:
                mode = getattr(keystone, f"KS_MODE_{job['mode']}")
                engines[key] = keystone.Ks(keystone.KS_ARCH_X86, mode)
        for source in job["sources"]:
            reply: dict[str, Any]
            try:
                code, _ = engines[key].asm(source, job["base"], True)
                reply = {"code": (code or b"").hex()}
            except keystone.KsError as error:
                reply = {"errno": error.errno, "message": str(error)}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
            if job["stop"] and not reply.get("code"):
                break


def _main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything Keystone prints on stdout must not mix with the replies
    _serve(sys.stdin, replies)


if __name__ == "__main__":
    _main()
