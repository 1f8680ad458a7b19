"""The kernel hrtimer behind the APIC timer and the PIT: expiry, restart, cancel, close."""

from __future__ import annotations

import threading
import time

from kvmlab.kernel.hrtimer import HrTimer

MS = 1_000_000


def test_one_shot_fires_once_at_its_time() -> None:
    fired: list[int] = []
    timer = HrTimer(lambda: fired.append(time.monotonic_ns()) and None, "t")
    start = time.monotonic_ns()
    timer.start(start + 20 * MS)
    time.sleep(0.3)
    timer.close()
    assert len(fired) == 1 and fired[0] >= start + 20 * MS
    assert not timer.active()


def test_periodic_restart_until_cancelled() -> None:
    count = 0
    period = 5 * MS
    next_at = time.monotonic_ns() + period

    def tick() -> int | None:
        nonlocal count, next_at
        count += 1
        next_at += period
        return next_at

    timer = HrTimer(tick, "t")
    timer.start(next_at)
    deadline = time.monotonic() + 10
    while count < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    timer.cancel()
    seen = count
    time.sleep(0.05)
    assert seen >= 5 and count == seen  # nothing fires after cancel returned
    timer.close()


def test_cancel_waits_for_a_running_callback() -> None:
    inside, release = threading.Event(), threading.Event()
    done: list[bool] = []

    def slow() -> None:
        inside.set()
        release.wait(5)
        done.append(True)

    timer = HrTimer(slow, "t")
    timer.start(time.monotonic_ns())
    assert inside.wait(5)
    threading.Timer(0.05, release.set).start()
    timer.cancel()
    assert done == [True]
    timer.close()


def test_close_ends_the_thread_and_start_after_close_does_nothing() -> None:
    fired: list[int] = []
    timer = HrTimer(lambda: fired.append(1) and None, "kvmlab-test-timer")
    timer.start(time.monotonic_ns() + 3600 * 1000 * MS)
    timer.close()
    names = [t.name for t in threading.enumerate()]
    assert "kvmlab-test-timer" not in names
    timer.start(time.monotonic_ns())
    time.sleep(0.05)
    assert fired == [] and not timer.active()


def test_a_cancel_during_the_callback_wins_over_its_restart() -> None:
    inside, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def periodic() -> int:
        calls.append(1)
        inside.set()
        release.wait(5)
        return time.monotonic_ns() + MS

    timer = HrTimer(periodic, "t")
    timer.start(time.monotonic_ns())
    assert inside.wait(5)
    threading.Timer(0.05, release.set).start()
    timer.cancel()  # waits for the callback, whose restart must not re-arm the timer
    time.sleep(0.05)
    assert calls == [1] and not timer.active()
    timer.close()
