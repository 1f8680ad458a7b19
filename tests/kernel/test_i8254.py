"""The in-kernel PIT's timer on the simulator alone: what no host comparison can show.

Its thread comes with the first timer and goes with the VM; ticks the guest never
acknowledges wait in reinject mode and pulse GSI 0 each time without it; a short periodic
count is limited as KVM limits it; a late periodic timer catches up one period at a time; in
HPET legacy mode channel 0 gets no timer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from polling import wait_until

from kvmlab import sys as k
from kvmlab.kernel import fs, trace
from kvmlab.kernel.arch.x86 import i8254
from kvmlab.uapi import (
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_VM,
    KVM_GET_IRQCHIP,
    KVM_PIT_FLAGS_HPET_LEGACY,
    KVM_REINJECT_CONTROL,
    KVM_SET_PIT2,
    kvm_irqchip,
    kvm_pit_config,
    kvm_pit_state2,
    kvm_reinject_control,
)

PIT_THREAD = f"kvm-pit/{os.getpid()}"


@contextmanager
def vm_with_pit() -> Iterator[tuple[int, i8254.KvmPit]]:
    """A VM (no vCPU) with the irqchip and a PIT; closed, and so destroyed, at the end."""
    kvm_fd = k.open("/dev/kvm", os.O_RDWR)
    vm_fd = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    try:
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        k.ioctl(vm_fd, KVM_CREATE_PIT2, kvm_pit_config())
        file = fs.fdget(vm_fd)
        assert file is not None
        yield vm_fd, file.private_data.arch.vpit
    finally:
        k.close(vm_fd)
        k.close(kvm_fd)


def program_channel_0(vm_fd: int, mode: int, count: int) -> None:
    """KVM_SET_PIT2 with channel 0 in `mode` and `count`, the others as at reset."""
    state = kvm_pit_state2()
    state.channels[0].mode, state.channels[0].count = mode, count
    for c in state.channels[1:]:
        c.mode, c.count = 0xFF, 0x10000
    k.ioctl(vm_fd, KVM_SET_PIT2, state)


def pit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PIT_THREAD]


def master_pic(vm_fd: int) -> kvm_irqchip:
    chip = kvm_irqchip(chip_id=0)
    k.ioctl(vm_fd, KVM_GET_IRQCHIP, chip)
    return chip


def test_the_timer_thread_starts_with_the_first_timer_and_ends_with_the_vm() -> None:
    before = set(pit_threads())  # other VMs' PITs, if any are open
    with vm_with_pit() as (vm_fd, pit):
        assert set(pit_threads()) == before  # mode 0xff at reset: no timer, no thread yet
        program_channel_0(vm_fd, 2, 2)  # the shortest period there is
        (thread,) = set(pit_threads()) - before
        assert thread.daemon and pit.timer.active()
    assert not thread.is_alive()  # closing the VM fd destroyed the VM, and joined the thread


def test_unacknowledged_ticks_wait_in_reinject_mode_and_pulse_without_it() -> None:
    """Reinject mode (the default): the guest never takes IRQ 0, so after the first pulse the
    expiries only count up as pending. With KVM_REINJECT_CONTROL 0 every expiry pulses."""
    with vm_with_pit() as (vm_fd, pit):
        with trace.recording() as rec:
            program_channel_0(vm_fd, 2, 1193)  # about 1 kHz
            assert wait_until(lambda: pit.pending >= 5)
        raises = [e for e in rec.events if e.kind == "enter" and e.func == "kvm_set_irq"]
        assert len(raises) == 2  # one pulse: raise, lower
        k.ioctl(vm_fd, KVM_REINJECT_CONTROL, bytes(kvm_reinject_control(pit_reinject=0)))
        with trace.recording() as rec:
            assert wait_until(lambda: rec.calls().count("kvm_set_irq") >= 6)  # three pulses
        pic = master_pic(vm_fd).chip.pic
    assert pic.irr & 1 and not pic.isr & 1  # IRQ 0 requested, never taken


def test_a_short_periodic_count_is_limited_to_min_timer_period_us() -> None:
    with vm_with_pit() as (vm_fd, pit):
        program_channel_0(vm_fd, 0, 2)  # one-shot: not limited
        assert (pit.period, pit.is_periodic) == (2 * 10**9 // 1_193_182, False)
        program_channel_0(vm_fd, 3, 2)
        assert (pit.period, pit.is_periodic) == (i8254.MIN_TIMER_PERIOD_US * 1000, True)


def test_a_late_periodic_timer_catches_up_one_period_at_a_time() -> None:
    """As KVM's hrtimer_add_expires_ns: the next expiry is one period on, even in the past,
    so every missed period fires (and counts as pending in reinject mode)."""
    with vm_with_pit() as (_, pit), pit.lock:
        pit.period, pit.is_periodic, pit.reinject = 1_000_000, True, True
        missed = i8254.ktime_get() - 10_500_000  # ten and a half periods late
        pit.timer.expires = lambda: missed  # type: ignore[method-assign]
        pending = pit.pending
        assert i8254.pit_timer_fn(pit) == missed + pit.period
        assert pit.pending == pending + 1


def test_hpet_legacy_mode_keeps_channel_0_without_a_timer() -> None:
    with vm_with_pit() as (vm_fd, pit):
        state = kvm_pit_state2(flags=KVM_PIT_FLAGS_HPET_LEGACY)  # the HPET drives IRQ 0
        state.channels[0].mode, state.channels[0].count = 2, 1193
        k.ioctl(vm_fd, KVM_SET_PIT2, state)
        assert not pit.timer.active() and pit.period == 0
