"""irqfd and ioeventfd inside the simulated kernel: the watcher thread's life, what happens to
an irqfd or an ioeventfd when userspace closes its eventfd, many irqfds on one VM, the trace,
and arm64 (no vGIC: KVM_IRQFD is EAGAIN; an MMIO ioeventfd takes a guest store).

The behaviour a program can see is compared with the host in
tests/differential/scenarios_eventfd.py; these tests look at what only the simulator shows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from differential.guest import Fds, machine
from differential.scenarios_eventfd import (
    DEASSIGN,
    DM,
    HANDLER_RAN,
    IDLE,
    PIO,
    WAIT,
    counter,
    eventfds,
    ioeventfd,
    irqfd,
    run_bounded,
    signal_later,
)
from differential.scenarios_irqchip import chip_machine, pic_guest
from polling import wait_until

from kvmlab import sys as k
from kvmlab.kernel import eventfd, fs, kvm_main, trace
from kvmlab.kernel.arch.arm64.arm import kvm_arm_exit, kvm_arm_init
from kvmlab.uapi import (
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_IRQFD_FLAG_DEASSIGN,
)

BOUND = 10.0  # seconds: the wait for something the watcher does in milliseconds


def kvm_of(vm_fd: int) -> kvm_main.Kvm:
    file = fs.fdget(vm_fd)
    assert file is not None
    kvm: kvm_main.Kvm = file.private_data
    return kvm


def holders(eventfd_id: int) -> list[int]:
    """Every fd of this process on the eventfd with this id."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if eventfd.eventfd_ctx_fdget(int(name)).id == eventfd_id:
                out.append(int(name))
        except OSError:
            pass  # not an eventfd, or the listing's own fd
    return out


def eventfd_id(fd: int) -> int:
    return eventfd.eventfd_ctx_fdget(fd).id


def irqfd_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kvm-irqfd"]


@pytest.fixture
def chip_vm() -> Iterator[tuple[Fds, int]]:
    """A VM with the in-kernel irqchip and no vCPU: closing its fd destroys it."""
    with Fds(k) as fds:
        vm = fds.create_vm(fds.open_kvm())
        k.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        yield fds, vm


def fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        return "closed"


def test_watcher_starts_with_the_first_irqfd_and_ends_with_the_vm_file() -> None:
    before = irqfd_threads()
    with chip_machine(k) as m, eventfds(1) as (efd,):
        kvm = kvm_of(m.vm_fd)
        ident = eventfd_id(efd)
        assert ioeventfd(k, m.vm_fd, efd, 0x90, 1, PIO) == 0
        assert kvm.irqfds.watcher is None and irqfd_threads() == before  # no irqfd, no thread
        assert irqfd(k, m.vm_fd, efd) == 0
        watcher = kvm.irqfds.watcher
        assert watcher is not None and watcher.thread.is_alive()
        assert irqfd_threads() == [*before, watcher.thread]
        epfd, wake_id = watcher.epfd, eventfd_id(watcher.wake)
        assert fd_kind(epfd) == "anon_inode:[eventpoll]"
        m.fds.close(m.vm_fd)  # the vCPU fd keeps the VM, not its irqfds (kvm_vm_release)
        assert not watcher.thread.is_alive() and kvm.irqfds.watcher is None
        assert irqfd_threads() == before
        assert fd_kind(epfd) != "anon_inode:[eventpoll]" and holders(wake_id) == []
        assert len(holders(ident)) == 2  # efd, and the ioeventfd's: it goes with the VM
    assert kvm.ioeventfds == [] and holders(ident) == []


def test_an_irqfd_lives_while_any_fd_keeps_its_eventfd(chip_vm: tuple[Fds, int]) -> None:
    _, vm = chip_vm
    kvm = kvm_of(vm)
    first = os.eventfd(0, os.EFD_NONBLOCK)
    second = os.dup(first)
    ident = eventfd_id(first)
    assert irqfd(k, vm, first) == 0
    assert holders(ident) == sorted([first, second])  # kvmlab keeps no fd of its own on it
    os.close(first)
    assert irqfd(k, vm, second, gsi=2) == "EBUSY"  # still bound to GSI 1
    assert [i.gsi for i in kvm.irqfds.items.values()] == [1]
    os.close(second)  # the last fd: the eventfd is gone, and with it the irqfd
    watcher = kvm.irqfds.watcher
    assert watcher is not None and watcher.live_tokens() == {watcher.WAKE}
    with eventfds(1) as (other,):
        assert irqfd(k, vm, other, gsi=1) == 0  # the next KVM_IRQFD drops the dead record
        assert [i.eventfd_id for i in kvm.irqfds.items.values()] == [eventfd_id(other)]


def test_an_ioeventfd_keeps_its_eventfd_until_deassigned() -> None:
    code = b"\xb0\x07\xe6\x90\xe6\x90\xf4"  # mov al, 7; out 0x90, al; twice; hlt
    with machine(k, code) as m:
        first = os.eventfd(0, os.EFD_NONBLOCK)
        ident = eventfd_id(first)
        assert ioeventfd(k, m.vm_fd, first, 0x90, 1, PIO) == 0
        second = os.dup(first)
        os.close(first)
        assert m.run() == KVM_EXIT_HLT and counter(second) == 2  # both OUTs signalled it
        assert len(holders(ident)) == 2  # second, and kvmlab's stand-in for KVM's reference
        assert ioeventfd(k, m.vm_fd, second, 0x90, 1, PIO | DEASSIGN) == 0
        assert holders(ident) == [second]
        os.close(second)


def test_the_vm_going_closes_what_its_ioeventfds_hold() -> None:
    with eventfds(1) as (efd,):
        ident = eventfd_id(efd)
        with machine(k) as m:
            for port in range(0x90, 0x98):
                assert ioeventfd(k, m.vm_fd, efd, port, 1, PIO) == 0
            assert len(holders(ident)) == 9
        assert holders(ident) == [efd]


def test_many_irqfds_each_injects_once_and_deassigned_ones_never(
    chip_vm: tuple[Fds, int],
) -> None:
    _, vm = chip_vm
    kvm = kvm_of(vm)
    n = 64
    with eventfds(n) as fds, trace.recording() as rec:

        def injected() -> int:
            return sum(
                1 for e in list(rec.events) if e.kind == "enter" and e.func == "irqfd_inject"
            )

        for i, fd in enumerate(fds):
            assert irqfd(k, vm, fd, gsi=i % 24) == 0
        assert len(kvm.irqfds.items) == n and len(irqfd_threads()) == 1
        for fd in fds:
            os.eventfd_write(fd, 1)
        assert wait_until(lambda: injected() == n, BOUND), injected()
        assert all(counter(fd) == 0 for fd in fds)  # each read by KVM before its injection
        gone, kept = fds[: n // 2], fds[n // 2 :]
        for i, fd in enumerate(gone):
            assert irqfd(k, vm, fd, gsi=i % 24, flags=KVM_IRQFD_FLAG_DEASSIGN) == 0
        for fd in fds:
            os.eventfd_write(fd, 1)
        assert wait_until(lambda: injected() == n + len(kept), BOUND), injected()
        assert [counter(fd) for fd in fds] == [1] * len(gone) + [0] * len(kept)
    threads = {e.thread for e in rec.events if e.func in ("irqfd_wakeup", "irqfd_inject")}
    assert threads == {"kvm-irqfd"} and injected() == n + len(kept)


def test_the_trace_shows_both_paths() -> None:
    with chip_machine(k) as m, eventfds(2) as (efd, bell):
        pic_guest(m, b"\xe6\x91" + IDLE)  # out 0x91, al: a doorbell; then wait for IRQ 1
        assert m.run() == KVM_EXIT_IO  # PIC programmed
        with trace.recording() as rec:
            ioeventfd(k, m.vm_fd, bell, 0x91, 1, PIO)
            irqfd(k, m.vm_fd, efd)
            timer = signal_later(efd)
            assert run_bounded(m, WAIT) == HANDLER_RAN
            timer.join()
        calls = rec.calls()
        assert counter(bell) == 1
        for name in ("kvm_ioeventfd", "ioeventfd_write", "kvm_irqfd", "kvm_irqfd_assign"):
            assert name in calls
        watcher = [e.func for e in rec.events if e.kind == "enter" and e.thread == "kvm-irqfd"]
        assert watcher[:3] == ["irqfd_wakeup", "irqfd_inject", "kvm_set_irq"]


@pytest.fixture
def arm64() -> Iterator[object]:
    """The arm64 module loaded in place of x86_64 (as tests/arm64 does), and back after."""
    x86_ops = kvm_main.kvm_arch_ops
    kvm_main.kvm_exit()
    kvm_arm_init()
    from arm64.harness import Vm

    vm = Vm()
    try:
        yield vm
    finally:
        vm.close()
        kvm_arm_exit()
        assert x86_ops is not None
        kvm_main.kvm_init(x86_ops)


def test_arm64_irqfd_needs_a_vgic_and_an_mmio_ioeventfd_takes_a_store(arm64: object) -> None:
    from kvmlab.uapi.arm64 import REG_PC

    vm = arm64
    base = 0x40000000
    vm.load(  # type: ignore[attr-defined]
        "ldr x1, =0x09000000\nmov w2, #0x48\nstr w2, [x1]\nmov w2, #0x49\nstr w2, [x1]\n"
        "ldr x0, =0x84000008\nhvc #0\n"
    )
    vcpu = vm.vcpu()  # type: ignore[attr-defined]
    vcpu.set(REG_PC, base)
    with eventfds(2) as (efd, bell):
        assert irqfd(k, vm.fd, efd) == "EAGAIN"  # type: ignore[attr-defined]
        assert irqfd(k, vm.fd, efd, flags=KVM_IRQFD_FLAG_DEASSIGN) == 0  # type: ignore[attr-defined]
        assert ioeventfd(k, vm.fd, bell, 0x09000000, 4, DM, 0x48) == 0  # type: ignore[attr-defined]
        run = vcpu.run()
        assert (run.exit_reason, run.mmio.phys_addr, run.mmio.data[0]) == (
            KVM_EXIT_MMIO,
            0x09000000,
            0x49,
        )
        assert counter(bell) == 1 and k.stats(vcpu.fd)["mmio_exit_kernel"] == 1
        assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT
