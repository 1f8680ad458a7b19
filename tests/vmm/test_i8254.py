"""The 8254 alone, on a clock the test moves: counting, latches, read-back, IRQ 0, port 0x61."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kvmlab.vmm.hw.i8254 import I8254, PCSpk, ticks_to_ns
from kvmlab.vmm.timer import TimerList


class Clock:
    """The machine clock, moved by the test in PIT ticks."""

    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, ticks: int) -> None:
        self.ns += ticks_to_ns(ticks) + 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pit(clock: Clock) -> Iterator[tuple[I8254, list[bool]]]:
    """A PIT whose timers fire only when the test says (no timer thread)."""
    levels: list[bool] = []
    timers = TimerList(threading.RLock(), clock)
    device = I8254(timers, on_irq=levels.append)
    yield device, levels
    timers.close()


def program(pit: I8254, channel: int, mode: int, count: int) -> None:
    pit.write(3, 1, channel << 6 | 3 << 4 | mode << 1)  # lobyte/hibyte
    pit.write(channel, 1, count & 0xFF)
    pit.write(channel, 1, count >> 8)


def read_word(pit: I8254, channel: int) -> int:
    low = pit.read(channel, 1)
    return low | pit.read(channel, 1) << 8


def test_mode_2_counts_down_and_reloads(pit: tuple[I8254, list[bool]], clock: Clock) -> None:
    dev, _ = pit
    program(dev, 0, 2, 1000)
    assert read_word(dev, 0) == 1000
    clock.advance(300)
    assert read_word(dev, 0) == 700
    clock.advance(1000)
    assert read_word(dev, 0) == 700  # reloaded: the same phase one period later


def test_the_latch_command_freezes_the_value_until_both_bytes_are_read(
    pit: tuple[I8254, list[bool]], clock: Clock
) -> None:
    dev, _ = pit
    program(dev, 0, 2, 5000)
    clock.advance(100)
    dev.write(3, 1, 0x00)  # counter latch, channel 0
    clock.advance(1000)
    assert read_word(dev, 0) == 4900
    assert read_word(dev, 0) == 3900  # live again


def test_read_back_latches_status_then_count(pit: tuple[I8254, list[bool]], clock: Clock) -> None:
    dev, _ = pit
    program(dev, 2, 0, 50)
    dev.write(3, 1, 0xC0 | 0x08)  # read-back of channel 2: count and status
    assert dev.read(2, 1) == (0 << 7) | (3 << 4) | (0 << 1)  # OUT low, lo/hi, mode 0
    assert read_word(dev, 2) == 50
    clock.advance(60)
    dev.write(3, 1, 0xC0 | 0x20 | 0x08)  # status only
    assert dev.read(2, 1) >> 7 == 1  # terminal count reached: OUT high


def test_lobyte_only_access_and_zero_means_65536(pit: tuple[I8254, list[bool]]) -> None:
    dev, _ = pit
    dev.write(3, 1, 0x14)  # channel 0, lobyte only, mode 2
    dev.write(0, 1, 0)
    assert dev.channels[0].count == 0x10000
    dev.write(0, 1, 0x80)
    assert dev.read(0, 1) == 0x80
    assert dev.read(3, 1) == 0xFF


def test_channel_0_in_mode_2_raises_irq_0_once_per_period(
    pit: tuple[I8254, list[bool]], clock: Clock
) -> None:
    dev, levels = pit
    program(dev, 0, 2, 1193)  # 1 kHz
    assert dev.irq_timer.pending
    del levels[:]
    for _ in range(3):
        clock.advance(1193)
        dev.irq_timer.timers.run_expired()
    assert dev.irqs == 3
    assert levels == [True, False, True, False, True]  # each high for one tick


def test_mode_0_fires_once_and_disarms(pit: tuple[I8254, list[bool]], clock: Clock) -> None:
    dev, levels = pit
    program(dev, 0, 0, 100)
    assert levels[-1] is False
    clock.advance(100)
    dev.irq_timer.timers.run_expired()
    assert levels[-1] is True
    assert not dev.irq_timer.pending


def test_port_61_gates_channel_2_and_shows_its_output(
    pit: tuple[I8254, list[bool]], clock: Clock
) -> None:
    dev, _ = pit
    spk = PCSpk(dev)
    spk.write(0, 1, 0x00)  # gate low
    program(dev, 2, 0, 20)
    spk.write(0, 1, 0x01)  # gate high
    first, second = spk.read(0, 1), spk.read(0, 1)
    assert first & 1 and not first & 0x20
    assert (first ^ second) & 0x10  # the refresh bit toggles
    clock.advance(25)
    assert spk.read(0, 1) & 0x20  # channel 2 reached its terminal count


def test_the_timer_thread_delivers_real_ticks() -> None:
    lock = threading.RLock()
    timers = TimerList(lock)
    timers.start()
    edges = threading.Semaphore(0)
    dev = I8254(timers, on_irq=lambda level: level and edges.release())
    try:
        with lock:
            program(dev, 0, 2, 1193)  # 1 kHz, on the real clock
        assert all(edges.acquire(timeout=2) for _ in range(5))
        with lock:
            dev.reset()
        assert not timers.armed()
    finally:
        timers.close()
