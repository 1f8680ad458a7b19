"""Exception and interrupt delivery: the part of the CPU that Unicorn leaves out.

Unicorn reports a guest exception (#GP, #PF, INT n, ...) to a hook and delivers nothing, so
kvmlab's "hardware" does what the processor does (Intel SDM vol. 3, chapter 6): read the gate
from the IVT (real mode) or the IDT (protected and long mode), push the frame, load CS:rip.
A fault while delivering escalates by the SDM's rules: to a double fault (#DF), and a fault
while delivering #DF is a triple fault, which VMX reports to KVM as a TRIPLE_FAULT exit.

Supported: real-mode IVT; 32-bit and 16-bit interrupt and trap gates; 64-bit gates with IST.
Not yet: task gates, privilege changes (a gate into a more privileged ring); those raise
`UnsupportedDeliveryError`, which KVM reports as an internal error rather than guessing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmlab.kernel.arch.x86.cpu_state import X86CpuState
from kvmlab.uapi.x86 import (
    X86_CR0_PE,
    X86_EFER_LMA,
    X86_RFLAGS_IF,
    X86_RFLAGS_RF,
    X86_RFLAGS_TF,
    X86_RFLAGS_VM,
    kvm_regs,
    kvm_segment,
    kvm_sregs,
)

DF_VECTOR = 8
GP_VECTOR = 13
NP_VECTOR = 11
SS_VECTOR = 12
PF_VECTOR = 14
X86_RFLAGS_NT = 1 << 14
X86_RFLAGS_AC = 1 << 18
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})
WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21})


class NestedFaultError(Exception):
    """An exception raised while delivering another one."""

    def __init__(self, vector: int, error_code: int = 0) -> None:
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code


class UnsupportedDeliveryError(Exception):
    """A delivery kvmlab's CPU does not implement (task gate, privilege change)."""


@dataclass(frozen=True)
class Event:
    """What is being delivered: a vector, its error code, and where it came from.

    `software`: raised by INT n / INT3 / INTO, whose length `insn_len` is needed to put rip
    back on the instruction if the delivery itself faults. `external`: an interrupt or NMI
    from outside the CPU, which is neither a fault nor a trap.
    """

    vector: int
    error_code: int | None = None
    software: bool = False
    insn_len: int = 0
    external: bool = False

    @property
    def is_fault(self) -> bool:
        """KVM's exception_type() == EXCPT_FAULT: the frame's RFLAGS image gets RF set."""
        if self.software or self.external or self.vector >= 32:
            return False
        return self.vector not in (1, 3, 4, DF_VECTOR, 18)


def is_double_fault(first: int, second: int) -> bool:
    """SDM table 6-5: which fault during which delivery becomes #DF."""
    if first in CONTRIBUTORY:
        return second in CONTRIBUTORY
    if first == PF_VECTOR:
        return second in CONTRIBUTORY or second == PF_VECTOR
    return False


def deliver(cpu: X86CpuState, event: Event) -> bool:
    """Deliver `event` to the guest; False means it ended in a triple fault.

    A triple fault leaves the registers as the last delivery found them, with RF set when a
    fault was being delivered (KVM sets RF before it injects a fault).
    """
    current = event
    while True:
        try:
            _deliver_once(cpu, current)
            return True
        except NestedFaultError as fault:
            if current.software and current.insn_len:  # the INT itself faulted: rip back on it
                cpu.set_rip(cpu.rip - current.insn_len)
            if current.vector == DF_VECTOR:
                _set_rf(cpu)
                return False
            if is_double_fault(current.vector, fault.vector):
                current = Event(DF_VECTOR, 0)
            else:
                current = Event(fault.vector, fault.error_code)


def _set_rf(cpu: X86CpuState) -> None:
    regs = kvm_regs()
    cpu.get_regs(regs)
    regs.rflags |= X86_RFLAGS_RF
    cpu.set_regs(regs)


def _read(cpu: X86CpuState, linear: int, size: int) -> bytes:
    data = cpu.read_virtual(linear, size)
    if data is None:
        raise NestedFaultError(PF_VECTOR)
    return data


def _idt_fault(vector: int, software: bool = False) -> NestedFaultError:
    """#GP with the IDT-vector error code: index << 3 | IDT bit | EXT."""
    return NestedFaultError(GP_VECTOR, (vector << 3) | 2 | (0 if software else 1))


def _deliver_once(cpu: X86CpuState, event: Event) -> None:
    regs, sregs = kvm_regs(), kvm_sregs()
    cpu.get_regs(regs)
    cpu.get_sregs(sregs)
    if event.is_fault:
        regs.rflags |= X86_RFLAGS_RF  # the frame shows RF; delivery then clears it
    if not sregs.cr0 & X86_CR0_PE:
        _deliver_real(cpu, event, regs, sregs)
    elif sregs.efer & X86_EFER_LMA:
        _deliver_long(cpu, event, regs, sregs)
    else:
        _deliver_protected(cpu, event, regs, sregs)


def _deliver_real(cpu: X86CpuState, event: Event, regs: kvm_regs, sregs: kvm_sregs) -> None:
    """Real mode: IVT entry (offset, segment); push FLAGS, CS, IP; clear IF, TF and AC."""
    vector = event.vector
    if vector * 4 + 3 > sregs.idt.limit:
        raise _idt_fault(vector, event.software)
    ip, cs = struct.unpack("<HH", _read(cpu, sregs.idt.base + vector * 4, 4))
    sp = regs.rsp & 0xFFFF
    frame = struct.pack("<HHH", regs.rip & 0xFFFF, sregs.cs.selector, regs.rflags & 0xFFFF)
    regs.rflags &= ~X86_RFLAGS_RF
    new_sp = (sp - 6) & 0xFFFF
    _push_frame(cpu, sregs.ss.base, new_sp, frame, 0xFFFF)
    regs.rsp = (regs.rsp & ~0xFFFF) | new_sp
    regs.rflags &= ~(X86_RFLAGS_IF | X86_RFLAGS_TF | X86_RFLAGS_AC)
    regs.rip = ip
    sregs.cs.selector, sregs.cs.base = cs, cs << 4
    cpu.set_regs(regs)
    cpu.set_sregs(sregs)


def _push_frame(cpu: X86CpuState, ss_base: int, sp: int, frame: bytes, mask: int) -> None:
    """Write the frame at ss_base+sp, byte ranges wrapping at the stack size like the CPU."""
    if sp + len(frame) - 1 <= mask:
        if not cpu.write_virtual((ss_base + sp) & 0xFFFF_FFFF_FFFF_FFFF, frame):
            raise NestedFaultError(PF_VECTOR)
        return
    for i, byte in enumerate(frame):  # the frame wraps around the top of a 16-bit stack
        if not cpu.write_virtual(ss_base + ((sp + i) & mask), bytes([byte])):
            raise NestedFaultError(PF_VECTOR)


def _code_segment(cpu: X86CpuState, sregs: kvm_sregs, selector: int, vector: int) -> kvm_segment:
    """The descriptor a gate's selector names, as a hidden-cache segment (GDT only)."""
    if selector & 0xFFFC == 0 or selector & 4:
        raise NestedFaultError(GP_VECTOR, selector & 0xFFFC)  # null selector, or the LDT
    index = selector & ~7
    if index + 7 > sregs.gdt.limit:
        raise NestedFaultError(GP_VECTOR, selector & 0xFFFC)
    lo, hi = struct.unpack("<II", _read(cpu, sregs.gdt.base + index, 8))
    seg = kvm_segment()
    seg.selector = selector
    seg.base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF00_0000)
    limit = (lo & 0xFFFF) | (hi & 0xF_0000)
    seg.type, seg.s, seg.dpl = (hi >> 8) & 0xF, (hi >> 12) & 1, (hi >> 13) & 3
    seg.present, seg.avl, seg.l = (hi >> 15) & 1, (hi >> 20) & 1, (hi >> 21) & 1
    seg.db, seg.g = (hi >> 22) & 1, (hi >> 23) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    if not seg.s or not seg.type & 8:
        raise NestedFaultError(GP_VECTOR, selector & 0xFFFC)  # not a code segment
    if not seg.present:
        raise NestedFaultError(NP_VECTOR, selector & 0xFFFC)
    seg.type |= 1  # the CPU sets the accessed bit when it loads the descriptor
    return seg


def _check_gate(event: Event, present: int, dpl: int, cpl: int, gate_type: int) -> None:
    vector = event.vector
    if gate_type == 0x5:
        raise UnsupportedDeliveryError(f"task gate for vector {vector}")
    if event.software and dpl < cpl:
        raise _idt_fault(vector, True)
    if not present:
        raise NestedFaultError(NP_VECTOR, (vector << 3) | 2 | (0 if event.software else 1))


def _new_cpl(seg: kvm_segment, cpl: int, vector: int) -> int:
    conforming = bool(seg.type & 4)
    new_cpl = cpl if conforming else seg.dpl
    if new_cpl != cpl:
        raise UnsupportedDeliveryError(f"vector {vector} changes privilege from ring {cpl}")
    return new_cpl


def _deliver_protected(cpu: X86CpuState, event: Event, regs: kvm_regs, sregs: kvm_sregs) -> None:
    """32-bit protected mode: an interrupt or trap gate (32- or 16-bit) at the same privilege."""
    vector = event.vector
    if vector * 8 + 7 > sregs.idt.limit:
        raise _idt_fault(vector, event.software)
    lo, hi = struct.unpack("<II", _read(cpu, sregs.idt.base + vector * 8, 8))
    gate_type, dpl, present = (hi >> 8) & 0xF, (hi >> 13) & 3, (hi >> 15) & 1
    cpl = cpu.cpl()
    if gate_type not in (0x5, 0x6, 0x7, 0xE, 0xF):
        raise _idt_fault(vector, event.software)
    _check_gate(event, present, dpl, cpl, gate_type)
    cs = _code_segment(cpu, sregs, lo >> 16, vector)
    new_cpl = _new_cpl(cs, cpl, vector)
    cs.selector = (cs.selector & ~3) | new_cpl
    offset = (lo & 0xFFFF) | (hi & 0xFFFF_0000)
    if regs.rflags & X86_RFLAGS_VM:
        raise UnsupportedDeliveryError("interrupt from virtual-8086 mode")
    wide = bool(gate_type & 8)  # 32-bit gate
    fmt, size = ("<I", 4) if wide else ("<H", 2)
    items = [regs.rflags, sregs.cs.selector, regs.rip]
    if event.error_code is not None:
        items.append(event.error_code)
    frame = b"".join(struct.pack(fmt, v & ((1 << (8 * size)) - 1)) for v in reversed(items))
    mask = 0xFFFF_FFFF if sregs.ss.db else 0xFFFF
    sp = (regs.rsp - len(frame)) & mask
    _push_frame(cpu, sregs.ss.base, sp, frame, mask)
    regs.rsp = (regs.rsp & ~mask) | sp
    regs.rflags &= ~(X86_RFLAGS_TF | X86_RFLAGS_NT | X86_RFLAGS_RF | X86_RFLAGS_VM)
    if gate_type & 1 == 0:  # an interrupt gate also masks interrupts
        regs.rflags &= ~X86_RFLAGS_IF
    regs.rip = offset if wide else offset & 0xFFFF
    sregs.cs = cs
    cpu.set_regs(regs)
    cpu.set_sregs(sregs)


def _deliver_long(cpu: X86CpuState, event: Event, regs: kvm_regs, sregs: kvm_sregs) -> None:
    """Long mode: a 64-bit gate; the frame is always SS, RSP, RFLAGS, CS, RIP (+ error code)."""
    vector = event.vector
    if vector * 16 + 15 > sregs.idt.limit:
        raise _idt_fault(vector, event.software)
    raw = _read(cpu, sregs.idt.base + vector * 16, 16)
    off_lo, selector, ist, attr, off_mid, off_hi = struct.unpack("<HHBBHI4x", raw)
    gate_type, dpl, present = attr & 0xF, (attr >> 5) & 3, attr >> 7
    cpl = cpu.cpl()
    if gate_type not in (0xE, 0xF):
        raise _idt_fault(vector, event.software)
    _check_gate(event, present, dpl, cpl, gate_type)
    cs = _code_segment(cpu, sregs, selector, vector)
    if not cs.l or cs.db:
        raise NestedFaultError(GP_VECTOR, selector & 0xFFFC)
    new_cpl = _new_cpl(cs, cpl, vector)
    cs.selector = (cs.selector & ~3) | new_cpl
    rsp = regs.rsp
    if ist & 7:
        rsp = struct.unpack("<Q", _read(cpu, sregs.tr.base + 0x24 + 8 * ((ist & 7) - 1), 8))[0]
    items = [sregs.ss.selector, regs.rsp, regs.rflags, sregs.cs.selector, regs.rip]
    if event.error_code is not None:
        items.append(event.error_code)
    frame = b"".join(struct.pack("<Q", v & 0xFFFF_FFFF_FFFF_FFFF) for v in reversed(items))
    sp = ((rsp & ~0xF) - len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
    if not cpu.write_virtual(sp, frame):
        raise NestedFaultError(PF_VECTOR)
    regs.rsp = sp
    regs.rflags &= ~(X86_RFLAGS_TF | X86_RFLAGS_NT | X86_RFLAGS_RF)
    if gate_type & 1 == 0:
        regs.rflags &= ~X86_RFLAGS_IF
    regs.rip = off_lo | (off_mid << 16) | (off_hi << 32)
    sregs.cs = cs
    cpu.set_regs(regs)
    cpu.set_sregs(sregs)
