"""Scenarios for the in-kernel irqchip (KVM_CREATE_IRQCHIP): its creation rules, the two 8259s
and the IOAPIC with the default GSI routing, KVM_IRQ_LINE(_STATUS), KVM_GET/SET_IRQCHIP, and
what changes for a vCPU: KVM_INTERRUPT is refused, KVM_SET_MP_STATE takes the APIC states,
the guest's PIC ports never exit, a PIC interrupt is injected at entry, and HLT sleeps inside
KVM_RUN until an interrupt (or a signal) instead of exiting.

Handlers report with `out 0x10, al`; rip is never recorded at OUT exits (it differs on PVM).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_CAP_IRQ_INJECT_STATUS,
    KVM_CAP_IRQCHIP,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_IO,
    KVM_GET_IRQCHIP,
    KVM_GET_MP_STATE,
    KVM_INTERRUPT,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_IRQCHIP_IOAPIC,
    KVM_MP_STATE_HALTED,
    KVM_SET_IRQCHIP,
    KVM_SET_MP_STATE,
    kvm_interrupt,
    kvm_irq_level,
    kvm_irqchip,
    kvm_mp_state,
    kvm_pic_state,
    kvm_regs,
)

from .guest import (
    CODE_ADDR,
    MEM_SIZE,
    STACK_TOP,
    Fds,
    Machine,
    set_region,
    setup_mode,
    try_ioctl,
    write_page_tables,
)
from .registry import scenario

IF = 1 << 9
PIC_FIELDS = [name for name, _ in kvm_pic_state._fields_]


@contextmanager
def chip_machine(
    k: Any, code: bytes = b"", *, irqchip: bool = True, mode: str = "real"
) -> Iterator[Machine]:
    """A VM like guest.machine() (real mode, or guest.py's other modes), with
    KVM_CREATE_IRQCHIP before its vCPU."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        if irqchip:
            k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        mem, hva = fds.ram(MEM_SIZE)
        r = set_region(k, vm_fd, 0, 0, MEM_SIZE, hva)
        assert r == 0, r
        vcpu_fd = fds.create_vcpu(vm_fd, 0)
        m = Machine(k, fds, sys_fd, vm_fd, vcpu_fd)
        m.mem, m.hva = mem, hva
        m.runmap = fds.map_run(sys_fd, vcpu_fd)
        m.write(CODE_ADDR, code)
        if mode == "long64":
            write_page_tables(mem)
        sregs = m.sregs()
        setup_mode(sregs, mode)
        m.set_sregs(sregs)
        m.set_regs(kvm_regs(rip=CODE_ADDR, rsp=STACK_TOP, rflags=0x2))
        yield m


def get_chip(k: Any, vm_fd: int, chip_id: int) -> kvm_irqchip | str:
    buf = bytearray(bytes(kvm_irqchip(chip_id=chip_id)))
    r = try_ioctl(k, vm_fd, KVM_GET_IRQCHIP, buf)
    return r if isinstance(r, str) else kvm_irqchip.from_buffer_copy(buf)


def pic(k: Any, vm_fd: int, chip_id: int) -> dict[str, int]:
    chip = get_chip(k, vm_fd, chip_id)
    assert not isinstance(chip, str), chip
    return {name: getattr(chip.chip.pic, name) for name in PIC_FIELDS}


def set_pic(k: Any, vm_fd: int, chip_id: int, **values: int) -> int | str:
    chip = get_chip(k, vm_fd, chip_id)
    assert not isinstance(chip, str), chip
    for name, value in values.items():
        setattr(chip.chip.pic, name, value)
    return try_ioctl(k, vm_fd, KVM_SET_IRQCHIP, bytes(chip))


def ioapic(k: Any, vm_fd: int) -> dict[str, Any]:
    chip = get_chip(k, vm_fd, KVM_IRQCHIP_IOAPIC)
    assert not isinstance(chip, str), chip
    io = chip.chip.ioapic
    return {
        "base_address": io.base_address,
        "ioregsel": io.ioregsel,
        "id": io.id,
        "irr": io.irr,
        "redirtbl": tuple(io.redirtbl[i].bits for i in range(24)),
    }


def set_redir(k: Any, vm_fd: int, entries: dict[int, int]) -> int | str:
    chip = get_chip(k, vm_fd, KVM_IRQCHIP_IOAPIC)
    assert not isinstance(chip, str), chip
    for pin, bits in entries.items():
        chip.chip.ioapic.redirtbl[pin].bits = bits
    return try_ioctl(k, vm_fd, KVM_SET_IRQCHIP, bytes(chip))


def line_status(k: Any, vm_fd: int, irq: int, level: int) -> int | str:
    """KVM_IRQ_LINE_STATUS: the status written back, or the errno name."""
    buf = bytearray(bytes(kvm_irq_level(irq=irq, level=level)))
    r = try_ioctl(k, vm_fd, KVM_IRQ_LINE_STATUS, buf)
    return r if isinstance(r, str) else kvm_irq_level.from_buffer_copy(buf).status


def irq_line(k: Any, vm_fd: int, irq: int, level: int) -> int | str:
    return try_ioctl(k, vm_fd, KVM_IRQ_LINE, bytes(kvm_irq_level(irq=irq, level=level)))


def mp_state(m: Machine) -> int:
    buf = bytearray(4)
    m.k.ioctl(m.vcpu_fd, KVM_GET_MP_STATE, buf)
    return int.from_bytes(buf, "little")


def set_mp_state(m: Machine, state: int) -> int | str:
    return try_ioctl(m.k, m.vcpu_fd, KVM_SET_MP_STATE, bytes(kvm_mp_state(state)))


def name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, str(reason))


@scenario
def irqchip_create_rules(k: Any) -> dict[str, Any]:
    """KVM_CAP_IRQCHIP and KVM_CAP_IRQ_INJECT_STATUS are 1; the irqchip ioctls are ENXIO
    before KVM_CREATE_IRQCHIP; a second one is EEXIST (even with vCPUs), and one after a
    vCPU exists EINVAL. KVM_INTERRUPT is ENXIO with the PIC in the kernel."""
    out: dict[str, Any] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        out["caps"] = tuple(
            k.ioctl(fd, KVM_CHECK_EXTENSION, cap)
            for fd in (sys_fd, vm_fd)
            for cap in (KVM_CAP_IRQCHIP, KVM_CAP_IRQ_INJECT_STATUS)
        )
        out["before"] = (
            irq_line(k, vm_fd, 1, 1),
            line_status(k, vm_fd, 1, 1),
            get_chip(k, vm_fd, 0),
        )
        out["create"] = try_ioctl(k, vm_fd, KVM_CREATE_IRQCHIP, 0)
        out["again"] = try_ioctl(k, vm_fd, KVM_CREATE_IRQCHIP, 0)
        vcpu_fd = fds.create_vcpu(vm_fd, 0)
        out["again_with_vcpu"] = try_ioctl(k, vm_fd, KVM_CREATE_IRQCHIP, 0)
        out["interrupt"] = try_ioctl(k, vcpu_fd, KVM_INTERRUPT, bytes(kvm_interrupt(irq=0x20)))
        vm2 = fds.create_vm(sys_fd)
        fds.create_vcpu(vm2, 0)
        out["after_vcpu"] = try_ioctl(k, vm2, KVM_CREATE_IRQCHIP, 0)
    assert out == {
        "caps": (1, 1, 1, 1),
        "before": ("ENXIO", "ENXIO", "ENXIO"),
        "create": 0,
        "again": "EEXIST",
        "again_with_vcpu": "EEXIST",
        "interrupt": "ENXIO",
        "after_vcpu": "EINVAL",
    }
    return out


@scenario
def irqchip_reset_state(k: Any) -> dict[str, Any]:
    """KVM_GET_IRQCHIP after creation: both PICs all zero but their ELCR masks (0xf8, 0xde);
    the IOAPIC at 0xfec00000 with every pin masked; a chip id above 2 is EINVAL."""
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        out = {
            "master": pic(k, vm_fd, 0),
            "slave": pic(k, vm_fd, 1),
            "ioapic": ioapic(k, vm_fd),
            "chip3": get_chip(k, vm_fd, 3),
        }
    assert out["master"] == {**dict.fromkeys(PIC_FIELDS, 0), "elcr_mask": 0xF8}
    assert out["slave"]["elcr_mask"] == 0xDE
    assert out["ioapic"]["base_address"] == 0xFEC00000
    assert out["ioapic"]["redirtbl"] == (1 << 16,) * 24 and out["chip3"] == "EINVAL"
    return out


@scenario
def irq_line_status_default_routing(k: Any) -> dict[str, Any]:
    """GSI 0-15 reach a PIC pin and an IOAPIC pin, 16-23 the IOAPIC alone, others nothing.
    With every IOAPIC pin masked the status is the PIC's: 1 delivered, 0 coalesced (an edge
    already latched), -1 masked; lowering a line is 1 from each chip. Both chips latch."""
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        raised = {irq: line_status(k, vm_fd, irq, 1) for irq in (0, 1, 2, 7, 8, 15, 16, 23, 24)}
        again = line_status(k, vm_fd, 1, 1)
        lowered = line_status(k, vm_fd, 1, 0)
        edge_again = line_status(k, vm_fd, 1, 1)
        plain = irq_line(k, vm_fd, 5, 1)
        state = {"master": pic(k, vm_fd, 0), "slave": pic(k, vm_fd, 1)}
        state["ioapic_irr"] = ioapic(k, vm_fd)["irr"]
        set_pic(k, vm_fd, 0, imr=0x08)
        masked = (line_status(k, vm_fd, 3, 1), line_status(k, vm_fd, 3, 0))
        set_pic(k, vm_fd, 1, elcr=0x02)  # IRQ 9 level-triggered
        level = (line_status(k, vm_fd, 9, 1), line_status(k, vm_fd, 9, 1))
        level_irr = pic(k, vm_fd, 1)["irr"]
        line_status(k, vm_fd, 9, 0)
        level_irr_low = pic(k, vm_fd, 1)["irr"]
    out = {
        "raised": raised,
        "again": again,
        "lowered": lowered,
        "edge_again": edge_again,
        "plain": plain,
        "state": state,
        "masked": masked,
        "level": level,
        "level_irr": (level_irr, level_irr_low),
    }
    assert raised[1] == 1 and raised[16] == -1 and raised[24] == -1
    assert (again, lowered, edge_again, plain) == (1, 2, 0, 0)
    assert masked == (-1, 1) and level == (1, 0)  # lowering: IOAPIC 1, masked PIC skipped
    assert out["level_irr"] == (0x83, 0x81)  # a level request follows the line
    return out


@scenario
def ioapic_entry_delivery_status(k: Any) -> dict[str, Any]:
    """An unmasked IOAPIC pin: with no vCPU nothing takes it (-1), and a level pin still sets
    remote IRR; with a vCPU, a fixed interrupt to its (software-disabled) APIC is not accepted
    (0, no remote IRR), to an APIC id nobody has neither; GSI 2 is the PIC's 1 + the masked
    IOAPIC pin. KVM_GET_IRQCHIP shows irr without the edges already delivered."""
    edge = 0x30 | (0 << 56)  # fixed, physical, dest 0, edge, unmasked
    level = 0x31 | (1 << 15)  # level-triggered
    out: dict[str, Any] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        set_redir(k, vm_fd, {17: edge, 18: level})
        out["no_vcpu"] = (line_status(k, vm_fd, 17, 1), line_status(k, vm_fd, 18, 1))
        out["no_vcpu_state"] = ioapic(k, vm_fd)["redirtbl"][17:19]
        vm2 = fds.create_vm(sys_fd)
        k.ioctl(vm2, KVM_CREATE_IRQCHIP, 0)
        fds.create_vcpu(vm2, 0)
        set_redir(k, vm2, {17: edge, 18: level, 19: edge | (5 << 56)})
        out["vcpu"] = tuple(line_status(k, vm2, gsi, 1) for gsi in (17, 18, 19, 2))
        state = ioapic(k, vm2)
        out["vcpu_state"] = (state["irr"], state["redirtbl"][17:20])
    assert out["no_vcpu"] == (-1, -1) and out["no_vcpu_state"] == (edge, level | (1 << 14))
    assert out["vcpu"] == (0, 0, 0, 1) and out["vcpu_state"][1][1] == level
    return out


@scenario
def mp_state_with_irqchip(k: Any) -> dict[str, Any]:
    """KVM_SET_MP_STATE takes only RUNNABLE without an in-kernel APIC; with one also
    UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED (read back as RUNNABLE: the SIPI is
    taken at once, at vector 0: cs 0, rip 0) and AP_RESET_HOLD."""
    out: dict[str, Any] = {}
    for chip in (False, True):
        with chip_machine(k, irqchip=chip) as m:
            results = []
            for state in range(12):
                r = set_mp_state(m, state)
                results.append((r, mp_state(m)))
                set_mp_state(m, 0)
            set_mp_state(m, 2 if chip else 0)
            set_mp_state(m, 4 if chip else 0)
            regs, sregs = m.regs(), m.sregs()
            out[f"irqchip={chip}"] = {
                "set": results,
                "after_sipi": (mp_state(m), regs.rip, sregs.cs.selector, sregs.cs.base),
            }
    assert out["irqchip=False"]["set"][1] == ("EINVAL", 0)
    assert out["irqchip=True"]["set"][3] == (0, KVM_MP_STATE_HALTED)
    assert out["irqchip=True"]["after_sipi"] == (0, 0, 0, 0)
    return out


PIC_INIT = (
    b"\xb0\x11\xe6\x20"  # mov al, 0x11; out 0x20, al   ICW1: edge, cascade, ICW4
    b"\xb0\x20\xe6\x21"  # mov al, 0x20; out 0x21, al   ICW2: vectors 0x20-0x27
    b"\xb0\x04\xe6\x21"  # mov al, 0x04; out 0x21, al   ICW3
    b"\xb0\x01\xe6\x21"  # mov al, 0x01; out 0x21, al   ICW4: 8086 mode
    b"\xb0\xfd\xe6\x21"  # mov al, 0xfd; out 0x21, al   OCW1: only IRQ 1
    b"\xb0\x0c\xe6\x20"  # mov al, 0x0c; out 0x20, al   OCW3: poll
    b"\xe4\x20"  # in al, 0x20                         the poll answer
    b"\x88\xc4"  # mov ah, al
    b"\xe4\x21"  # in al, 0x21                         IMR
    b"\xe6\x12"  # out 0x12, al                        tell the host: programmed
)
HANDLER = 0x1800
PIC_HANDLER = (
    b"\xb0\x21\xe6\x10"  # mov al, 0x21; out 0x10, al
    b"\xb0\x20\xe6\x20"  # mov al, 0x20; out 0x20, al   EOI
    b"\xcf"  # iret
)


def pic_guest(m: Machine, tail: bytes) -> None:
    m.write(CODE_ADDR, PIC_INIT + tail)
    m.write(HANDLER, PIC_HANDLER)
    m.mem[0x21 * 4 : 0x21 * 4 + 4] = HANDLER.to_bytes(2, "little") + b"\x00\x00"


@scenario
def pic_programmed_by_guest_takes_irq(k: Any) -> dict[str, Any]:
    """The guest programs the in-kernel PIC (no exits for ports 0x20/0x21; a poll with nothing
    pending reads 7); IRQ 1 raised from userspace is injected at the next entry (IF=1) as
    vector 0x21; the handler's EOI ends it; then `sti; hlt` with nothing pending, and the
    host raises IRQ 1 from another thread: the HLT never exits, the vCPU wakes for it."""
    tail = b"\xfb\x90\xf4\xe6\x13"  # sti; nop; hlt; out 0x13, al
    with chip_machine(k) as m:
        pic_guest(m, tail)
        first = m.run()
        io = m.io()
        ax = m.regs().rax & 0xFFFF
        state = pic(k, m.vm_fd, 0)
        pulse = (line_status(k, m.vm_fd, 1, 1), line_status(k, m.vm_fd, 1, 0))
        m.update_regs(rflags=0x2 | IF)
        handler = (name(m.run()), m.io()["port"], m.io()["data"])
        isr = pic(k, m.vm_fd, 0)["isr"]
        timer = threading.Timer(0.05, lambda: irq_line(k, m.vm_fd, 1, 1) and None)
        timer.start()
        try:
            woke = (name(m.run()), m.io()["port"], m.io()["data"])
        finally:
            timer.join()
        irq_line(k, m.vm_fd, 1, 0)
        last = (name(m.run()), m.io()["port"], mp_state(m))
    out = {
        "first": (name(first), io["port"], ax),
        "programmed": {f: state[f] for f in ("irq_base", "imr", "init_state", "isr", "irr")},
        "pulse": pulse,
        "handler": handler,
        "isr_in_handler": isr,
        "woke": woke,
        "last": last,
    }
    assert first == KVM_EXIT_IO and io["port"] == 0x12 and ax == 0x07FD
    assert handler == ("IO", 0x10, b"\x21") and isr == 0x02 and woke == handler
    assert last == ("IO", 0x13, 0)
    return out


@scenario
def hlt_with_irqchip_blocks_until_signal(k: Any) -> dict[str, Any]:
    """`cli; hlt` with the irqchip: KVM_RUN sleeps (no HLT exit) until a signal: EINTR with
    KVM_EXIT_INTR, the vCPU HALTED, rip past the hlt; kvm_run says ready_for_interrupt_injection
    (the PIC is in the kernel)."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    try:
        with chip_machine(k, b"\xfa\xf4\xf4") as m:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            start = time.monotonic()
            r = m.try_run()
            slept = time.monotonic() - start
            out = {
                "run": r,
                "exit": name(m.exit_reason),
                "mp_state": mp_state(m),
                "rip": m.regs().rip,
                "ready": m.header()["ready_for_interrupt_injection"],
            }
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert slept >= 0.05, slept
    assert out == {"run": "EINTR", "exit": "INTR", "mp_state": 3, "rip": 0x1002, "ready": 1}
    return out
