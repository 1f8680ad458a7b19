"""Two helpers that keep each step cheap: one watchdog thread for every step's time limit, and
one trace subscription for the Workbench's life (subscribing swaps every traced function)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvmlab.kernel import trace


class Watchdog:
    """Calls `fire` when an armed deadline passes; one thread, however many steps."""

    def __init__(self, fire: Callable[[], None]) -> None:
        self.fire = fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="workbench-watchdog", daemon=True)
        self._thread.start()

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._deadline = time.monotonic() + seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(1.0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
            self.fire()  # outside the lock: fire() may wait for the machine's lock


class Tracer:
    """A standing subscription to the kernel trace; `take()` returns the events since `start()`."""

    def __init__(self) -> None:
        self._handle: int | None = None
        self._events: list[trace.TraceEvent] | None = None

    def subscribe(self) -> None:
        if self._handle is None:
            self._handle = trace.subscribe(self._event)

    def unsubscribe(self) -> None:
        if self._handle is not None:
            trace.unsubscribe(self._handle)
            self._handle = None

    @property
    def subscribed(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        self._events = [] if self._handle is not None else None

    def take(self) -> trace.Recording | None:
        """The events since start() as a Recording (None when not subscribed)."""
        events, self._events = self._events, None
        if events is None:
            return None
        rec = trace.Recording()
        rec.events = events
        return rec

    def _event(self, event: trace.TraceEvent) -> None:
        events = self._events
        if events is not None:
            events.append(event)
