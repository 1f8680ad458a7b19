"""The x86 half of the vCPU loop: QEMU's target/i386/kvm/kvm.c hooks, cut down.

`kvm_cpu_exec` (kvm_all.py) is architecture-neutral; around KVM_RUN it calls these hooks:
`kvm_arch_pre_run` injects an interrupt (userspace irqchip: KVM_INTERRUPT) or asks for an
interrupt window, `kvm_arch_post_run` reads back IF/CR8/APIC base, and `kvm_arch_handle_exit`
takes the exits the generic switch does not know (HLT, DEBUG, EXCEPTION, FAIL_ENTRY). With the
irqchip in the kernel there is nothing to inject and no HLT exit: KVM's mp_state says whether
a vCPU sleeps in HLT or waits for INIT/SIPI (`kvm_get_mp_state`, `kvm_put_mp_state`), and its
local APIC's registers move with KVM_GET_LAPIC/KVM_SET_LAPIC (`kvm_get_apic`, `kvm_put_apic`).
https://gitlab.com/qemu-project/qemu/-/blob/master/target/i386/kvm/kvm.c
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_INTERRUPT,
    KVM_MP_STATE_HALTED,
    KVM_SET_CPUID2,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    SEGMENT_NAMES,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    kvm_interrupt,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_regs,
    kvm_sregs,
)
from kvmlab.vmm.cpu import CPU_INTERRUPT_HARD, EXCP_DEBUG, EXCP_HLT, CPUState
from kvmlab.vmm.cpu_model import FeatureWord, X86CPUDefinition, cpu_x86_cpuid, cpuid2

log = logging.getLogger("kvmlab.vmm")
X86_CR4_PSE = 1 << 4
PTE_PRESENT = 1 << 0
PTE_LARGE = 1 << 7
ADDR_MASK = 0xFFFFFFFFFF000  # bits 51:12 of a page-table entry
CODE_BYTES = 16  # instruction bytes shown from rip in a register dump


# --- registers: QEMU's env <-> KVM ------------------------------------------------------------


@dataclass(eq=False)
class X86CPU(CPUState):
    """An x86 vCPU of a CPU model (QEMU's X86CPU): `features` are the model's, filtered by
    what KVM supports (vmm.cpu_model); `apic_id` goes into CPUID leaf 1."""

    model: X86CPUDefinition | None = None
    features: dict[FeatureWord, int] = field(default_factory=dict)
    apic_id: int = 0


def kvm_arch_init_vcpu(cpu: CPUState) -> None:
    """A new vCPU: give KVM its CPUID table if it has a model (a plain CPUState keeps KVM's
    default, an empty table: every leaf reads zero), then read its reset registers."""
    if isinstance(cpu, X86CPU) and cpu.model is not None:
        entries = cpu_x86_cpuid(cpu.model, cpu.features, cpu.apic_id)
        cpu.k.ioctl(cpu.kvm_fd, KVM_SET_CPUID2, cpuid2(entries))
    kvm_arch_get_registers(cpu)


def kvm_arch_get_registers(cpu: CPUState) -> None:
    """KVM_GET_REGS/KVM_GET_SREGS into the CPU's copy (cpu.regs, cpu.sregs)."""
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_REGS, cpu.regs)
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_SREGS, cpu.sregs)


def kvm_arch_put_registers(cpu: CPUState) -> None:
    """KVM_SET_SREGS/KVM_SET_REGS from the CPU's copy (sregs first: rip is relative to CS)."""
    cpu.k.ioctl(cpu.kvm_fd, KVM_SET_SREGS, cpu.sregs)
    cpu.k.ioctl(cpu.kvm_fd, KVM_SET_REGS, cpu.regs)


def kvm_get_mp_state(cpu: CPUState) -> None:
    """KVM_GET_MP_STATE into cpu.mp_state; with the irqchip in the kernel it is also what
    `halted` means (HLT sleeps in KVM, which only mp_state HALTED shows)."""
    mp_state = kvm_mp_state()
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_MP_STATE, mp_state)
    cpu.mp_state = mp_state.mp_state
    if cpu.irqchip_in_kernel:
        cpu.halted = mp_state.mp_state == KVM_MP_STATE_HALTED


def kvm_put_mp_state(cpu: CPUState) -> None:
    """KVM_SET_MP_STATE from cpu.mp_state: RUNNABLE, or UNINITIALIZED for an application
    processor that waits for INIT and SIPI (only with the irqchip in the kernel)."""
    cpu.k.ioctl(cpu.kvm_fd, KVM_SET_MP_STATE, kvm_mp_state(cpu.mp_state))


def kvm_get_apic(cpu: CPUState) -> bytes:
    """KVM_GET_LAPIC: the vCPU's local APIC registers, as the 1 KiB page KVM keeps."""
    state = kvm_lapic_state()
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_LAPIC, state)
    return bytes(state)


def kvm_put_apic(cpu: CPUState, registers: bytes) -> None:
    """KVM_SET_LAPIC: load the vCPU's local APIC registers (a page from kvm_get_apic)."""
    cpu.k.ioctl(cpu.kvm_fd, KVM_SET_LAPIC, kvm_lapic_state.from_buffer_copy(registers))


# --- around KVM_RUN ---------------------------------------------------------------------------


def kvm_arch_process_async_events(cpu: CPUState) -> bool:
    """A halted vCPU wakes only for an interrupt it can take; True means stay halted. With
    the irqchip in the kernel, KVM itself waits for that interrupt: always enter."""
    if cpu.irqchip_in_kernel:
        return False
    if cpu.interrupt_request & CPU_INTERRUPT_HARD and cpu.if_flag:
        cpu.halted = False
    return cpu.halted


def kvm_arch_pre_run(cpu: CPUState) -> None:
    """Inject a pending interrupt if the guest can take it now, else ask KVM to tell us when.

    Without an in-kernel irqchip, KVM_INTERRUPT queues the vector for the next entry without
    checking IF, so it may only be used when kvm_run says ready_for_interrupt_injection;
    otherwise request_interrupt_window makes KVM exit with IRQ_WINDOW_OPEN once it is. With
    the PIC in the kernel, KVM does all of this itself (QEMU: `if (!kvm_pic_in_kernel())`).
    """
    if cpu.irqchip_in_kernel:
        return
    run = cpu.kvm_run
    if (
        run.ready_for_interrupt_injection
        and cpu.interrupt_request & CPU_INTERRUPT_HARD
        and cpu.if_flag
    ):
        irq = cpu.board.cpu_get_pic_interrupt(cpu)
        if irq >= 0:
            try:
                cpu.k.ioctl(cpu.kvm_fd, KVM_INTERRUPT, kvm_interrupt(irq))
            except OSError as e:  # as QEMU: report and go on
                log.warning("KVM: injection failed, interrupt lost (%s)", e.strerror)
    run.request_interrupt_window = 1 if cpu.interrupt_request & CPU_INTERRUPT_HARD else 0


def kvm_arch_post_run(cpu: CPUState) -> None:
    """Keep what KVM reports on every return: the guest's IF, its TPR (CR8), the APIC base."""
    run = cpu.kvm_run
    cpu.if_flag = bool(run.if_flag)
    cpu.cr8 = run.cr8
    cpu.apic_base = run.apic_base


def kvm_handle_halt(cpu: CPUState) -> int:
    """HLT: stay in the loop if an interrupt can be taken at once, else halt the vCPU."""
    if not (cpu.interrupt_request & CPU_INTERRUPT_HARD and cpu.if_flag):
        cpu.halted = True
        return EXCP_HLT
    return 0


def kvm_arch_handle_exit(cpu: CPUState) -> int:
    """The exits the generic switch leaves to the architecture; <0 stops the VM."""
    run = cpu.kvm_run
    reason = run.exit_reason
    if reason == KVM_EXIT_HLT:
        return kvm_handle_halt(cpu)
    if reason == KVM_EXIT_DEBUG:
        return EXCP_DEBUG
    if reason == KVM_EXIT_EXCEPTION:
        cpu.last_error = (
            f"KVM: exception {run.ex.exception} exit (error code {run.ex.error_code:#x})\n"
            + x86_cpu_dump_state(cpu)
        )
    elif reason == KVM_EXIT_FAIL_ENTRY:
        cpu.last_error = (
            "KVM: entry failed, hardware error "
            f"{run.fail_entry.hardware_entry_failure_reason:#x}\n" + x86_cpu_dump_state(cpu)
        )
    else:
        name = EXIT_REASON_NAMES.get(reason, "?")
        cpu.last_error = f"KVM: unknown exit reason {reason} ({name})\n" + x86_cpu_dump_state(cpu)
    return -1


# --- reports ----------------------------------------------------------------------------------


def cpu_get_pc(cpu: CPUState) -> int | None:
    """The guest's rip, fresh from KVM (None if KVM_GET_REGS fails)."""
    regs = kvm_regs()
    try:
        cpu.k.ioctl(cpu.kvm_fd, KVM_GET_REGS, regs)
    except OSError:
        return None
    return int(regs.rip)


def x86_cpu_dump_state(cpu: CPUState) -> str:
    """Registers (fresh from KVM) and the instruction bytes at rip, like QEMU's `info registers`."""
    regs, sregs = kvm_regs(), kvm_sregs()
    try:
        cpu.k.ioctl(cpu.kvm_fd, KVM_GET_REGS, regs)
        cpu.k.ioctl(cpu.kvm_fd, KVM_GET_SREGS, sregs)
    except OSError as e:
        return f"(registers unavailable: {e.strerror})"
    g = {f[0]: getattr(regs, f[0]) for f in kvm_regs._fields_}
    lines = [
        " ".join(f"{n.upper():3}={g[n]:016x}" for n in names)
        for names in (
            ("rax", "rbx", "rcx", "rdx"),
            ("rsi", "rdi", "rbp", "rsp"),
            ("r8", "r9", "r10", "r11"),
            ("r12", "r13", "r14", "r15"),
            ("rip", "rflags"),
        )
    ]
    for name in SEGMENT_NAMES:
        s = getattr(sregs, name)
        lines.append(
            f"{name.upper():3}={s.selector:04x} {s.base:016x} {s.limit:08x} type={s.type:x} "
            f"p={s.present} dpl={s.dpl} db={s.db} s={s.s} l={s.l} g={s.g}"
        )
    lines.append(f"GDT={sregs.gdt.base:016x} {sregs.gdt.limit:08x}")
    lines.append(f"IDT={sregs.idt.base:016x} {sregs.idt.limit:08x}")
    lines.append(
        f"CR0={sregs.cr0:08x} CR2={sregs.cr2:016x} CR3={sregs.cr3:016x} CR4={sregs.cr4:08x} "
        f"EFER={sregs.efer:016x}"
    )
    linear = regs.rip if sregs.efer & X86_EFER_LMA else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
    gpa = x86_translate(sregs, linear, cpu.board.memory_read)
    code = cpu.board.memory_read(gpa, CODE_BYTES) if gpa is not None else None
    lines.append("Code=" + (code.hex(" ") if code else "(not in guest RAM)"))
    return "\n".join(lines)


def x86_translate(
    sregs: kvm_sregs, linear: int, read: Callable[[int, int], bytes | None]
) -> int | None:
    """The guest-physical address of `linear` under the guest's paging; None if not mapped."""
    if not sregs.cr0 & X86_CR0_PG:
        return linear
    shifts: tuple[int, ...]
    if sregs.efer & X86_EFER_LMA:  # 4 levels of 512 8-byte entries
        table, entry_size, bits, shifts = sregs.cr3 & ADDR_MASK, 8, 9, (39, 30, 21, 12)
    elif sregs.cr4 & X86_CR4_PAE:  # a 4-entry PDPT, then 2 levels of 512 8-byte entries
        pdpte = read((sregs.cr3 & 0xFFFFFFE0) + 8 * ((linear >> 30) & 3), 8)
        if pdpte is None or not struct.unpack("<Q", pdpte)[0] & PTE_PRESENT:
            return None
        table, entry_size, bits, shifts = struct.unpack("<Q", pdpte)[0] & ADDR_MASK, 8, 9, (21, 12)
    else:  # 2 levels of 1024 4-byte entries
        table, entry_size, bits, shifts = sregs.cr3 & 0xFFFFF000, 4, 10, (22, 12)
    fmt = "<Q" if entry_size == 8 else "<I"
    for shift in shifts:
        raw = read(table + entry_size * ((linear >> shift) & ((1 << bits) - 1)), entry_size)
        if raw is None:
            return None
        entry = struct.unpack(fmt, raw)[0]
        if not entry & PTE_PRESENT:
            return None
        large = shift != 12 and entry & PTE_LARGE
        if large and entry_size == 4 and not sregs.cr4 & X86_CR4_PSE:
            large = False
        if shift == 12 or large:
            frame = entry & ~((1 << shift) - 1) & ADDR_MASK
            return int(frame | (linear & ((1 << shift) - 1)))
        table = entry & ADDR_MASK
    return None


cpu_dump_state = x86_cpu_dump_state  # the name kvm_all calls for any target
