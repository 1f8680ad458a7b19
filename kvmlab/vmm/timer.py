"""Timers for device models: QEMU's QEMUTimer on QEMU_CLOCK_VIRTUAL, cut down.

A device arms a timer for a deadline on the machine's clock (host monotonic nanoseconds by
default); once `start()`ed, one thread per machine sleeps until the earliest deadline and runs
that timer's callback with the big lock held, as QEMU's main loop runs expired timers under the
BQL. Without the thread, `run_expired()` fires what is due: a test moving its own clock does so.
https://gitlab.com/qemu-project/qemu/-/blob/master/util/qemu-timer.c
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

NANOSECONDS_PER_SECOND = 1_000_000_000


def qemu_clock_get_ns() -> int:
    """The machine's clock: monotonic host time in nanoseconds."""
    return time.monotonic_ns()


Clock = Callable[[], int]


class QEMUTimer:
    """A one-shot timer: `timer_mod(deadline)` arms it, `timer_del()` disarms it."""

    def __init__(self, timers: TimerList, callback: Callable[[], None]) -> None:
        self.timers = timers
        self.callback = callback
        self.expire_time = -1  # -1: not armed

    def timer_mod(self, expire_time: int) -> None:
        """Run the callback once the clock reaches `expire_time` (replaces any earlier one)."""
        with self.timers.lock:
            self.expire_time = expire_time
            self.timers.wake()

    def timer_del(self) -> None:
        with self.timers.lock:
            self.expire_time = -1

    @property
    def pending(self) -> bool:
        return self.expire_time >= 0


class TimerList:
    """The timers of one machine and the thread that fires them under `lock` (the BQL)."""

    def __init__(self, lock: threading.RLock, clock: Clock = qemu_clock_get_ns) -> None:
        self.lock = lock
        self.clock = clock
        self._cond = threading.Condition(lock)
        self._timers: list[QEMUTimer] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def timer_new(self, callback: Callable[[], None]) -> QEMUTimer:
        timer = QEMUTimer(self, callback)
        with self.lock:
            self._timers.append(timer)
        return timer

    def armed(self) -> bool:
        """True while some timer will fire: what may still wake a halted vCPU."""
        with self.lock:
            return any(t.pending for t in self._timers)

    def start(self) -> None:
        """Start the thread that fires timers as the clock reaches them."""
        with self.lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
                self._thread.start()

    def wake(self) -> None:
        """A deadline changed: make the thread look again."""
        self._cond.notify_all()

    def run_expired(self) -> float | None:
        """Fire every timer whose deadline has passed; seconds to the next one (None: none)."""
        with self.lock:
            while not self._closed:
                armed = [t for t in self._timers if t.pending]
                if not armed:
                    return None
                timer = min(armed, key=lambda t: t.expire_time)
                delay = timer.expire_time - self.clock()
                if delay > 0:
                    return delay / NANOSECONDS_PER_SECOND
                timer.expire_time = -1
                timer.callback()  # may re-arm the timer
            return None

    def _run(self) -> None:
        with self.lock:
            while not self._closed:
                self._cond.wait(self.run_expired())

    def close(self) -> None:
        """End the thread (the machine is going away); timers never fire after this."""
        with self.lock:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(1.0)
