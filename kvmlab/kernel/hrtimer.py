"""A kernel hrtimer: a function called at an absolute CLOCK_MONOTONIC time, on its own thread.

The in-kernel timers (the local APIC timer, the PIT) arm one to fire at a deadline; the
function runs on the timer's thread and returns the next expiry to restart (a periodic timer,
HRTIMER_RESTART) or None to stop (HRTIMER_NORESTART). `cancel` waits for a running callback to
finish, as hrtimer_cancel does, unless the callback cancels its own timer.
https://elixir.bootlin.com/linux/v6.12/source/kernel/time/hrtimer.c
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

IDLE_WAIT = 1.0  # seconds: how long an idle timer thread sleeps before it looks again


class HrTimer:
    """struct hrtimer with its own daemon thread, started at the first `start`."""

    def __init__(self, function: Callable[[], int | None], name: str) -> None:
        self.function = function
        self.name = name
        self._cond = threading.Condition()
        self._expires: int | None = None  # ns, CLOCK_MONOTONIC, while armed
        self._last = 0  # the expiry last armed, kept when it fires or is cancelled
        self._running = False  # the callback is running now
        self._generation = 0  # bumped by every start and cancel: a stale restart is dropped
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, expires_ns: int) -> None:
        """hrtimer_start with HRTIMER_MODE_ABS: (re)arm for `expires_ns`."""
        with self._cond:
            if self._closed:
                return
            self._expires = self._last = expires_ns
            self._generation += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def cancel(self) -> None:
        """hrtimer_cancel: disarm, and wait for a callback running on another thread."""
        with self._cond:
            self._expires = None
            self._generation += 1
            if threading.current_thread() is not self._thread:
                while self._running:
                    self._cond.wait(IDLE_WAIT)

    def active(self) -> bool:
        """hrtimer_active: armed, or its callback running."""
        with self._cond:
            return self._expires is not None or self._running

    def expires(self) -> int:
        """hrtimer_get_expires: the expiry last armed (also once fired or cancelled)."""
        with self._cond:
            return self._last

    def remaining(self) -> int:
        """hrtimer_get_remaining: nanoseconds to that expiry (negative once past it)."""
        return self.expires() - time.monotonic_ns()

    def close(self) -> None:
        """Cancel for good and end the thread (the owner is going away)."""
        self.cancel()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(IDLE_WAIT)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._expires is None:
                        self._cond.wait(IDLE_WAIT)
                        continue
                    wait = (self._expires - time.monotonic_ns()) / 1e9
                    if wait <= 0:
                        break
                    self._cond.wait(min(wait, IDLE_WAIT))
                if self._closed:
                    return
                self._expires = None
                self._running = True
                generation = self._generation
            restart = None
            try:
                restart = self.function()
            finally:
                with self._cond:
                    self._running = False
                    # restart only if nobody started or cancelled the timer meanwhile
                    if restart is not None and self._generation == generation:
                        self._expires = self._last = restart
                    self._cond.notify_all()
