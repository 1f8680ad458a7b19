"""Scenarios for KVM_IOEVENTFD and KVM_IRQFD (virt/kvm/eventfd.c).

- the errno of every way each ioctl can be refused, in KVM's order, and their capabilities;
- an ioeventfd on a port and on an MMIO address: a matching guest write signals the eventfd
  and does not exit; a write of another length or value still exits;
- an irqfd on GSI 1 of the in-kernel PIC: a thread signals the eventfd while the guest is
  halted and its handler runs (it reports with `out 0x10, al`); KVM takes the counter; a
  signal already pending at KVM_IRQFD is injected at once but left in the counter; the
  irqfd outlives the fd it was assigned through while another fd keeps the eventfd open;
  after DEASSIGN, and after the VM fd is closed, a signal interrupts nothing.

- a RESAMPLE irqfd on a level-triggered IOAPIC pin: the line stays high until the guest's EOI,
  which lowers it and signals the resamplefd.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvmlab.uapi import (
    KVM_CAP_IOEVENTFD,
    KVM_CAP_IOEVENTFD_ANY_LENGTH,
    KVM_CAP_IOEVENTFD_NO_LENGTH,
    KVM_CAP_IRQFD,
    KVM_CAP_IRQFD_RESAMPLE,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_IRQFD_FLAG_RESAMPLE,
    kvm_ioeventfd,
    kvm_irqfd,
)

from .guest import Fds, Machine, machine, try_ioctl
from .registry import host_is_pvm, scenario
from .scenarios_irqchip import chip_machine, ioapic, name, pic_guest
from .scenarios_lapic import (
    CODE,
    HANDLERS,
    IOAPIC_GUEST,
    IOAPIC_HANDLER,
    apic_vm,
    asm,
    run_to_io,
    set_vector,
)

KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3
PIO, DM = KVM_IOEVENTFD_FLAG_PIO, KVM_IOEVENTFD_FLAG_DATAMATCH
DEASSIGN = KVM_IOEVENTFD_FLAG_DEASSIGN
U64_MAX = (1 << 64) - 1
HANDLER_RAN = ("IO", 0x10, b"\x21")  # pic_guest's IRQ 1 handler: out 0x10, al (0x21)


@contextmanager
def eventfds(n: int) -> Iterator[list[int]]:
    """`n` non-blocking eventfds, closed after."""
    fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def counter(fd: int) -> int:
    """Read (and so reset) an eventfd's counter; 0 when nothing was signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def ioeventfd(
    k: Any, vm_fd: int, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0
) -> int | str:
    arg = kvm_ioeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags)
    return try_ioctl(k, vm_fd, KVM_IOEVENTFD, bytes(arg))


def irqfd(
    k: Any, vm_fd: int, fd: int, gsi: int = 1, flags: int = 0, resamplefd: int = 0
) -> int | str:
    arg = kvm_irqfd(fd=fd & 0xFFFFFFFF, gsi=gsi, flags=flags, resamplefd=resamplefd & 0xFFFFFFFF)
    return try_ioctl(k, vm_fd, KVM_IRQFD, bytes(arg))


@scenario
def eventfd_capabilities(k: Any) -> dict[str, Any]:
    """KVM_CAP_IRQFD, KVM_CAP_IOEVENTFD and KVM_CAP_IOEVENTFD_ANY_LENGTH are 1 on /dev/kvm
    and on a VM; so are KVM_CAP_IRQFD_RESAMPLE and KVM_CAP_IOEVENTFD_NO_LENGTH on the VM."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        caps = (KVM_CAP_IRQFD, KVM_CAP_IOEVENTFD, KVM_CAP_IOEVENTFD_ANY_LENGTH)
        out = {
            "caps": tuple(
                k.ioctl(fd, KVM_CHECK_EXTENSION, cap) for fd in (sys_fd, vm_fd) for cap in caps
            ),
            "cap_resample": k.ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQFD_RESAMPLE),
            "cap_no_length": k.ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IOEVENTFD_NO_LENGTH),
        }
    assert out["caps"] == (1,) * 6
    return out


@scenario
def ioeventfd_errnos(k: Any) -> dict[str, Any]:
    """KVM_IOEVENTFD assign checks, in order: len in {0,1,2,4,8}, addr + len must not wrap,
    no unknown flag, no DATAMATCH with len 0 (all EINVAL), then the fd (EBADF, EINVAL for a
    file that is no eventfd), then a collision (EEXIST: same bus and address, and a write
    could match both). DEASSIGN checks only the fd, then needs an exact match (ENOENT)."""
    with Fds(k) as fds, eventfds(2) as (efd, other):
        vm = fds.create_vm(fds.open_kvm())
        out: dict[str, Any] = {
            "bad_len": [ioeventfd(k, vm, efd, 0x90, n, PIO) for n in (3, 5, 16)],
            "bad_len_before_fd": ioeventfd(k, vm, -1, 0x90, 3, PIO),
            "wraps": [ioeventfd(k, vm, efd, U64_MAX, n) for n in (1, 2)],
            "flags": [ioeventfd(k, vm, efd, 0x90, 1, PIO | 1 << n) for n in (5, 6, 31)],
            "len0_datamatch": ioeventfd(k, vm, efd, 0x90, 0, PIO | DM),
            "bad_fd": [ioeventfd(k, vm, fd, 0x90, 1, PIO) for fd in (-1, 1000)],
            "not_eventfd": ioeventfd(k, vm, vm, 0x90, 1, PIO),
            "len0_at_top": ioeventfd(k, vm, efd, U64_MAX, 0),
            "ccw_bus": ioeventfd(k, vm, efd, 0x100, 0, KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY),
        }
        out["pio"] = [
            ioeventfd(k, vm, efd, 0x90, 1, PIO),
            ioeventfd(k, vm, other, 0x90, 1, PIO),  # another eventfd, the same writes
            ioeventfd(k, vm, efd, 0x90, 0, PIO),  # length 0 overlaps every length
            ioeventfd(k, vm, efd, 0x90, 2, PIO),
            ioeventfd(k, vm, efd, 0x90, 1, PIO | DM, 5),  # a wildcard takes every value
            ioeventfd(k, vm, efd, 0x90, 1, 0),  # the MMIO bus is another bus
        ]
        out["datamatch"] = [
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DM, 5),
            ioeventfd(k, vm, other, 0x92, 1, PIO | DM, 5),
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DM, 6),
            ioeventfd(k, vm, efd, 0x92, 1, PIO),
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DM, 0x105),  # never matches a byte: taken
        ]
        out["deassign"] = [
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DM | DEASSIGN, 7),  # no such value
            ioeventfd(k, vm, other, 0x92, 1, PIO | DM | DEASSIGN, 5),  # another eventfd
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DEASSIGN),  # a wildcard is not a value
            ioeventfd(k, vm, efd, 0x92, 2, PIO | DM | DEASSIGN, 5),  # another length
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DM | DEASSIGN, 5),
            ioeventfd(k, vm, efd, 0x92, 1, PIO | DM | DEASSIGN, 5),  # gone
            ioeventfd(k, vm, -1, 0x92, 1, PIO | DEASSIGN),
            ioeventfd(k, vm, vm, 0x92, 1, PIO | DEASSIGN),
            ioeventfd(k, vm, efd, 0x90, 3, PIO | DEASSIGN),  # len is not checked: no match
            ioeventfd(k, vm, efd, 0x90, 1, PIO | DEASSIGN | 1 << 5),  # flags neither
            ioeventfd(k, vm, efd, 0x90, 1, PIO),  # free again
        ]
    assert out["bad_len"] == ["EINVAL"] * 3 and out["bad_len_before_fd"] == "EINVAL"
    assert out["wraps"] == ["EINVAL"] * 2 and out["flags"] == ["EINVAL"] * 3
    assert out["len0_datamatch"] == "EINVAL" and out["not_eventfd"] == "EINVAL"
    assert out["bad_fd"] == ["EBADF"] * 2 and out["len0_at_top"] == 0
    assert out["pio"] == [0, "EEXIST", "EEXIST", 0, "EEXIST", 0]
    assert out["datamatch"] == [0, "EEXIST", 0, "EEXIST", 0]
    assert out["deassign"] == ["ENOENT"] * 4 + [0, "ENOENT", "EBADF", "EINVAL", "ENOENT", 0, 0]
    return out


@scenario
def irqfd_errnos(k: Any) -> dict[str, Any]:
    """KVM_IRQFD: unknown flags EINVAL; without an in-kernel irqchip every assign is EINVAL
    (x86), while DEASSIGN checks only the fd and is 0 even for an eventfd never assigned.
    With the irqchip: the fd (EBADF, EINVAL if no eventfd), the resamplefd of a RESAMPLE
    irqfd likewise, then one GSI per eventfd (EBUSY, through any fd of it, for any GSI).
    Any GSI number is taken."""
    with Fds(k) as fds, eventfds(4) as (efd, other, third, resample):
        vm = fds.create_vm(fds.open_kvm())
        out: dict[str, Any] = {
            "no_chip": [irqfd(k, vm, efd), irqfd(k, vm, -1), irqfd(k, vm, vm)],
            "no_chip_deassign": [
                irqfd(k, vm, fd, flags=KVM_IRQFD_FLAG_DEASSIGN) for fd in (efd, -1, vm)
            ],
            "bad_flags": [irqfd(k, vm, efd, flags=1 << n) for n in (2, 3, 31)],
        }
        k.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        res = KVM_IRQFD_FLAG_RESAMPLE
        dup = os.dup(efd)
        try:
            out["fds"] = [irqfd(k, vm, fd) for fd in (-1, 1000, vm)]
            out["resamplefd"] = [irqfd(k, vm, efd, flags=res, resamplefd=fd) for fd in (-1, vm)]
            out["assign"] = [
                irqfd(k, vm, efd, gsi=5),
                irqfd(k, vm, efd, gsi=5),
                irqfd(k, vm, efd, gsi=6),
                irqfd(k, vm, dup, gsi=7),
                irqfd(k, vm, efd, gsi=8, flags=res, resamplefd=resample),
                irqfd(k, vm, other, gsi=1000),
            ]
            out["deassign"] = [
                irqfd(k, vm, efd, gsi=6, flags=KVM_IRQFD_FLAG_DEASSIGN),  # another GSI: 0
                irqfd(k, vm, third, gsi=5, flags=KVM_IRQFD_FLAG_DEASSIGN),  # never assigned
                irqfd(k, vm, dup, gsi=5, flags=KVM_IRQFD_FLAG_DEASSIGN),  # through the dup
                irqfd(k, vm, efd, gsi=6),  # the eventfd is free again
                irqfd(k, vm, efd, gsi=6, flags=KVM_IRQFD_FLAG_DEASSIGN | res),
            ]
            out["resample_accepted"] = irqfd(k, vm, third, gsi=9, flags=res, resamplefd=resample)
        finally:
            os.close(dup)
    assert out["no_chip"] == ["EINVAL"] * 3 and out["bad_flags"] == ["EINVAL"] * 3
    assert out["no_chip_deassign"] == [0, "EBADF", "EINVAL"]
    assert out["fds"] == ["EBADF", "EBADF", "EINVAL"]
    assert out["resamplefd"] == ["EBADF", "EINVAL"]
    assert out["assign"] == [0, "EBUSY", "EBUSY", "EBUSY", "EBUSY", 0]
    assert out["deassign"] == [0, 0, 0, 0, 0]
    return out


def exits_until_hlt(m: Machine) -> list[tuple[Any, ...]]:
    """Run until HLT; each exit as (reason, port or address, data)."""
    exits: list[tuple[Any, ...]] = []
    for _ in range(16):
        reason = m.run()
        if reason == KVM_EXIT_IO:
            exits.append((name(reason), m.io()["port"], m.io()["data"]))
        elif reason == KVM_EXIT_MMIO:
            r = m.kvm_run()
            data = bytes(r.mmio.data[: r.mmio.len])
            exits.append((name(reason), r.mmio.phys_addr, r.mmio.is_write, data))
        else:
            exits.append((name(reason),))
            break
    return exits


PIO_GUEST = (
    b"\xb0\x05\xe6\x90"  # mov al, 5; out 0x90, al       len-0 wildcard at 0x90: taken
    b"\xe7\x90"  # out 0x90, ax                          any length: taken
    b"\xba\x92\x00\xee"  # mov dx, 0x92; out dx, al      datamatch 6: 5 exits
    b"\xb0\x06\xee\xee"  # mov al, 6; out dx, al; twice  taken, taken
    b"\xe6\x94"  # out 0x94, al                          nothing there: exits
    b"\xe7\x96"  # out 0x96, ax                          a len-1 ioeventfd: a word exits
    b"\xe6\x96"  # out 0x96, al                          taken
    b"\xf4"  # hlt
)


@scenario
def ioeventfd_port_write_does_not_exit(k: Any) -> dict[str, Any]:
    """Guest OUTs to ports with ioeventfds: a match signals the eventfd and the guest runs on;
    another value (DATAMATCH) or another length exits as usual. Each counter counts its
    writes."""
    with machine(k, PIO_GUEST) as m, eventfds(3) as (any_len, match6, byte):
        assigned = [
            ioeventfd(k, m.vm_fd, any_len, 0x90, 0, PIO),
            ioeventfd(k, m.vm_fd, match6, 0x92, 1, PIO | DM, 6),
            ioeventfd(k, m.vm_fd, byte, 0x96, 1, PIO),
        ]
        exits = exits_until_hlt(m)
        out = {
            "assigned": assigned,
            "exits": exits,
            "counters": (counter(any_len), counter(match6), counter(byte)),
        }
    assert out["exits"] == [
        ("IO", 0x92, b"\x05"),
        ("IO", 0x94, b"\x06"),
        ("IO", 0x96, b"\x06\x00"),
        ("HLT",),
    ]
    assert out["counters"] == (2, 2, 1)
    return out


MMIO_BASE = 0x20000  # above the 64 KiB of RAM: no memslot
MMIO_GUEST = (
    b"\xb8\x00\x20\x8e\xc0"  # mov ax, 0x2000; mov es, ax           es base 0x20000
    b"\xb0\x07\x26\xa2\x00\x00"  # mov al, 7; mov es:[0], al        len-0 at +0: taken
    b"\x26\xa3\x00\x00"  # mov es:[0], ax                           taken
    b"\x66\xb8\x78\x56\x34\x12"  # mov eax, 0x12345678
    b"\x66\x26\xa3\x10\x00"  # mov es:[0x10], eax                  datamatch: taken
    b"\x66\x26\xa3\x10\x00"  # again                               taken
    b"\x26\xa3\x10\x00"  # mov es:[0x10], ax                        a word: exits
    b"\x66\x40"  # inc eax
    b"\x66\x26\xa3\x10\x00"  # mov es:[0x10], eax                  another value: exits
    b"\xf4"  # hlt
)


@scenario
def ioeventfd_mmio_store_does_not_exit(k: Any) -> dict[str, Any]:
    """Guest stores to addresses outside every slot with MMIO ioeventfds: a match signals and
    does not exit; a store of another length or value is a KVM_EXIT_MMIO write."""
    with machine(k, MMIO_GUEST) as m, eventfds(2) as (any_len, match):
        assigned = [
            ioeventfd(k, m.vm_fd, any_len, MMIO_BASE, 0),
            ioeventfd(k, m.vm_fd, match, MMIO_BASE + 0x10, 4, DM, 0x12345678),
        ]
        exits = exits_until_hlt(m)
        out = {"assigned": assigned, "exits": exits, "counters": (counter(any_len), counter(match))}
    assert out["exits"] == [
        ("MMIO", MMIO_BASE + 0x10, 1, b"\x78\x56"),
        ("MMIO", MMIO_BASE + 0x10, 1, b"\x79\x56\x34\x12"),
        ("HLT",),
    ]
    assert out["counters"] == (2, 2)
    return out


def run_bounded(m: Machine, seconds: float) -> Any:
    """KVM_RUN ended by SIGALRM after `seconds` if nothing else ends it: an exit, or EINTR."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        r = m.try_run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return r if isinstance(r, str) else (name(r), m.io()["port"], m.io()["data"])


def signal_later(fd: int) -> threading.Timer:
    """Write 1 to the eventfd from another thread in 50 ms (the guest is halted by then)."""
    timer = threading.Timer(0.05, os.eventfd_write, (fd, 1))
    timer.start()
    return timer


IDLE = b"\xfb\xf4\xeb\xfd"  # sti; hlt; jmp back to the hlt
WAIT = 10.0  # seconds: the bound on a run that an irqfd ends; it ends in milliseconds


@scenario
def irqfd_interrupts_halted_guest(k: Any) -> dict[str, Any]:
    """The guest programs the PIC (only IRQ 1 unmasked) and halts with IF=1. An irqfd on GSI 1:
    another thread signals the eventfd, the HLT wakes and the IRQ 1 handler runs; KVM took the
    counter. Signalled before KVM_IRQFD: injected at once, the counter is left. With the fd it
    was assigned through closed, another fd of the eventfd still signals it (and KVM still
    takes the counter). After DEASSIGN a signal wakes nothing, nor after the VM fd is closed
    (the vCPU fd keeps the VM)."""
    with chip_machine(k) as m, eventfds(2) as (efd, late):
        pic_guest(m, IDLE)
        out: dict[str, Any] = {"programmed": name(m.run()), "assign": irqfd(k, m.vm_fd, efd)}
        timer = signal_later(efd)
        out["woke"] = run_bounded(m, WAIT)
        timer.join()
        out["counter_after"] = counter(efd)
        irqfd(k, m.vm_fd, efd, flags=KVM_IRQFD_FLAG_DEASSIGN)
        os.eventfd_write(efd, 3)
        via = os.dup(efd)
        out["assign_pending"] = irqfd(k, m.vm_fd, via)
        out["pending"] = run_bounded(m, WAIT)
        out["pending_counter"] = counter(efd)
        os.close(via)  # the eventfd stays open through efd
        timer = signal_later(efd)
        out["through_other_fd"] = run_bounded(m, WAIT)
        timer.join()
        out["other_fd_counter"] = counter(efd)
        out["deassign"] = irqfd(k, m.vm_fd, efd, flags=KVM_IRQFD_FLAG_DEASSIGN)
        os.eventfd_write(efd, 1)
        out["after_deassign"] = run_bounded(m, 0.3)
        irqfd(k, m.vm_fd, late)
        m.fds.close(m.vm_fd)
        os.eventfd_write(late, 1)
        out["after_vm_close"] = run_bounded(m, 0.3)
    assert out["programmed"] == "IO" and out["assign"] == 0
    assert out["woke"] == out["pending"] == out["through_other_fd"] == HANDLER_RAN
    assert out["counter_after"] == out["other_fd_counter"] == 0 and out["pending_counter"] == 3
    assert out["after_deassign"] == out["after_vm_close"] == "EINTR"
    return out


# VMX: the line stays high through the handler; its EOI lowers it and signals the resamplefd.
# PVM acknowledges the level interrupt as it delivers it (no ISR bit, remote IRR already clear:
# see the lapic and IOAPIC scenarios), so its resampler has run before the handler does.
RESAMPLE_VMX = {"in_handler": (("IO", 0x10, 0x45), 0, 1), "after_eoi": (("IO", 0x11, 0), 1, 0)}
RESAMPLE_PVM = {"in_handler": (("IO", 0x10, 0x45), 1, 0), "after_eoi": (("IO", 0x11, 0), 0, 0)}


@scenario(
    documented={
        key: {
            "sim": RESAMPLE_VMX[key],
            "host": (RESAMPLE_PVM if host_is_pvm() else RESAMPLE_VMX)[key],
        }
        for key in RESAMPLE_VMX
    }
)
def irqfd_resample_on_a_level_pin(k: Any) -> dict[str, Any]:
    """A RESAMPLE irqfd on GSI 5, which the guest routed (IOAPIC, level-triggered) to its
    handler: the signal raises the line and it stays high (remote IRR set) while the handler
    runs; the handler's EOI lowers it and signals the resamplefd, once; nothing is delivered
    again. DEASSIGN lowers the line of a resampler it ends."""
    with apic_vm(k) as (m,), eventfds(2) as (efd, resample):
        m.write(CODE, asm(IOAPIC_GUEST, CODE))
        m.write(HANDLERS, asm(IOAPIC_HANDLER, HANDLERS))
        set_vector(m, 0x45, HANDLERS)
        flags = KVM_IRQFD_FLAG_RESAMPLE
        out: dict[str, Any] = {
            "assign": irqfd(k, m.vm_fd, efd, gsi=5, flags=flags, resamplefd=resample)
        }
        out["programmed"] = run_to_io(m)
        os.eventfd_write(efd, 1)
        out["in_handler"] = (run_to_io(m), counter(resample), ioapic(k, m.vm_fd)["irr"] >> 5 & 1)
        out["after_eoi"] = (run_to_io(m), counter(resample), ioapic(k, m.vm_fd)["irr"] >> 5 & 1)
        out["then"] = run_to_io(m, limit=0.1)
        os.eventfd_write(efd, 1)
        out["again"] = run_to_io(m)
        deassign = KVM_IRQFD_FLAG_DEASSIGN
        out["deassign"] = irqfd(k, m.vm_fd, efd, gsi=5, flags=deassign)
        out["line_after_deassign"] = ioapic(k, m.vm_fd)["irr"] >> 5 & 1
    assert out["assign"] == 0 and out["then"] == "EINTR", out
    assert out["in_handler"][1] + out["after_eoi"][1] == 1, out  # the resamplefd, once
    assert out["line_after_deassign"] == 0
    return out
