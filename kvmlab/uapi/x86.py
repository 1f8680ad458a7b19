"""<asm/kvm.h> for x86_64: registers, segments, debug state, sync regs, and the x86 `kvm_run`."""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_char, c_int64, c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any

from kvmlab.uapi.ioctl import _IO, _IOR, _IOW, _IOWR
from kvmlab.uapi.kvm import KVMIO, make_kvm_run

KVM_NR_INTERRUPTS = 256

KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS

KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1
KVM_RUN_X86_GUEST_MODE = 1 << 2


class kvm_regs(ctypes.Structure):  # noqa: N801 (kernel name)
    """KVM_GET_REGS / KVM_SET_REGS: the general-purpose registers, rip and rflags."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class kvm_segment(ctypes.Structure):  # noqa: N801
    """A segment register with its hidden descriptor cache (what the CPU really uses)."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):  # noqa: N801
    """GDTR / IDTR: base and limit."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(ctypes.Structure):  # noqa: N801
    """KVM_GET_SREGS / KVM_SET_SREGS: segments, descriptor tables, control registers, EFER."""

    _fields_ = [
        *[(name, kvm_segment) for name in SEGMENT_NAMES],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_debug_exit_arch(ctypes.Structure):  # noqa: N801
    """kvm_run.debug.arch on x86: the exception (1 = #DB, 3 = #BP), linear pc, dr6, dr7."""

    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class kvm_guest_debug_arch(ctypes.Structure):  # noqa: N801
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(ctypes.Structure):  # noqa: N801
    """KVM_SET_GUEST_DEBUG: control bits (KVM_GUESTDBG_*) and DR0-DR7."""

    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


class _EventsException(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _EventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _EventsNmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _EventsSmi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class _EventsTripleFault(ctypes.Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(ctypes.Structure):  # noqa: N801
    """KVM_GET/SET_VCPU_EVENTS: pending or injected exception, interrupt, NMI, SMI, triple fault."""

    _fields_ = [
        ("exception", _EventsException),
        ("interrupt", _EventsInterrupt),
        ("nmi", _EventsNmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _EventsSmi),
        ("triple_fault", _EventsTripleFault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_sync_regs(ctypes.Structure):  # noqa: N801
    """kvm_run.s.regs: registers KVM copies out (kvm_valid_regs) or in (kvm_dirty_regs)."""

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


kvm_run = make_kvm_run(kvm_debug_exit_arch, kvm_sync_regs)


class kvm_fpu(ctypes.Structure):  # noqa: N801
    """KVM_GET_FPU / KVM_SET_FPU: the x87 registers and status, and the SSE registers."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),  # ST0-ST7: 80-bit values in 16-byte slots
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),  # the abridged (FXSAVE) tag word: one bit per register
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


# --- variable-length structures: a header followed by a flexible array of entries ---------------


class kvm_cpuid_entry2(ctypes.Structure):  # noqa: N801
    """One CPUID leaf (function) and subleaf (index) with the four registers it returns."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX: `index` selects the entry
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):  # noqa: N801
    """KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 / KVM_GET_CPUID2: nent, then nent entries.

    This is the bare header, as `sizeof(struct kvm_cpuid2)` in C; `flex(kvm_cpuid2, n)` is the
    struct with room for n entries.
    """

    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_msr_entry(ctypes.Structure):  # noqa: N801
    """One model-specific register: its index (ECX of rdmsr) and its 64-bit value."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):  # noqa: N801
    """KVM_GET_MSRS / KVM_SET_MSRS: nmsrs, then nmsrs entries (`flex(kvm_msrs, n)`)."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):  # noqa: N801
    """KVM_GET_MSR_INDEX_LIST: nmsrs (in: room, out: count), then the MSR indices."""

    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 0)]


@functools.cache
def flex(header: type[ctypes.Structure], n: int) -> type[ctypes.Structure]:
    """`header` (kvm_cpuid2, kvm_msrs, kvm_msr_list) with room for `n` array entries.

    The same fields, the last one (the flexible array) with `n` elements: so
    `flex(kvm_cpuid2, 4)(nent=4)` is the 168-byte buffer a C program would malloc, and it
    passes to ioctl like any other struct.
    """
    fields: list[Any] = list(header._fields_)
    name, array = fields[-1]
    fields[-1] = (name, array._type_ * n)
    return type(f"{header.__name__}[{n}]", (ctypes.Structure,), {"_fields_": fields})


KVM_GET_REGS = _IOR(KVMIO, 0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _IOW(KVMIO, 0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _IOR(KVMIO, 0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _IOW(KVMIO, 0x84, ctypes.sizeof(kvm_sregs))
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, ctypes.sizeof(kvm_guest_debug))
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, ctypes.sizeof(kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, ctypes.sizeof(kvm_vcpu_events))
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, ctypes.sizeof(kvm_msr_list))
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, ctypes.sizeof(kvm_cpuid2))
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, ctypes.sizeof(kvm_msr_list))
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, ctypes.sizeof(kvm_msrs))
KVM_SET_MSRS = _IOW(KVMIO, 0x89, ctypes.sizeof(kvm_msrs))
KVM_GET_FPU = _IOR(KVMIO, 0x8C, ctypes.sizeof(kvm_fpu))
KVM_SET_FPU = _IOW(KVMIO, 0x8D, ctypes.sizeof(kvm_fpu))
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, ctypes.sizeof(kvm_cpuid2))
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, ctypes.sizeof(kvm_cpuid2))

KVM_NR_IRQCHIPS = 3
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24


class kvm_pic_state(ctypes.Structure):  # noqa: N801
    """One in-kernel 8259's registers (KVM_GET/SET_IRQCHIP, chip 0 master, 1 slave)."""

    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        )
    ]


class _RedirFields(ctypes.Structure):
    _fields_ = [
        ("vector", c_uint8),
        ("delivery_mode", c_uint8, 3),
        ("dest_mode", c_uint8, 1),
        ("delivery_status", c_uint8, 1),
        ("polarity", c_uint8, 1),
        ("remote_irr", c_uint8, 1),
        ("trig_mode", c_uint8, 1),
        ("mask", c_uint8, 1),
        ("reserve", c_uint8, 7),
        ("reserved", c_uint8 * 4),
        ("dest_id", c_uint8),
    ]


class _RedirEntry(ctypes.Union):
    _fields_ = [("bits", c_uint64), ("fields", _RedirFields)]


class kvm_ioapic_state(ctypes.Structure):  # noqa: N801
    """The in-kernel IOAPIC (KVM_GET/SET_IRQCHIP, chip 2): 24 redirection entries."""

    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", _RedirEntry * KVM_IOAPIC_NUM_PINS),
    ]


class _IrqchipUnion(ctypes.Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):  # noqa: N801
    """KVM_GET_IRQCHIP / KVM_SET_IRQCHIP: one chip's state, chosen by chip_id."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _IrqchipUnion)]


KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, ctypes.sizeof(kvm_irqchip))
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, ctypes.sizeof(kvm_irqchip))

KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):  # noqa: N801
    """KVM_GET/SET_LAPIC: the local APIC's register page, each register at its MMIO offset."""

    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, ctypes.sizeof(kvm_lapic_state))
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, ctypes.sizeof(kvm_lapic_state))


class kvm_pit_channel_state(ctypes.Structure):  # noqa: N801
    """One channel of the in-kernel 8254 (KVM_GET/SET_PIT2)."""

    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_pit_state(ctypes.Structure):  # noqa: N801
    """KVM_GET/SET_PIT: the three channels."""

    _fields_ = [("channels", kvm_pit_channel_state * 3)]


class kvm_pit_state2(ctypes.Structure):  # noqa: N801
    """KVM_GET/SET_PIT2: the three channels and the flags (HPET legacy, speaker data)."""

    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class kvm_pit_config(ctypes.Structure):  # noqa: N801
    """KVM_CREATE_PIT2's argument: flags (KVM_PIT_SPEAKER_DUMMY) and padding."""

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_reinject_control(ctypes.Structure):  # noqa: N801
    """KVM_REINJECT_CONTROL: whether the PIT replays ticks the guest has not acknowledged."""

    _fields_ = [("pit_reinject", c_uint8), ("reserved", c_uint8 * 31)]


KVM_PIT_SPEAKER_DUMMY = 1
KVM_PIT_FLAGS_HPET_LEGACY = 0x1
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x2
KVM_CREATE_PIT = _IO(KVMIO, 0x64)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, ctypes.sizeof(kvm_pit_config))
KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71)
KVM_GET_PIT = _IOWR(KVMIO, 0x65, ctypes.sizeof(kvm_pit_state))
KVM_SET_PIT = _IOR(KVMIO, 0x66, ctypes.sizeof(kvm_pit_state))
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, ctypes.sizeof(kvm_pit_state2))
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, ctypes.sizeof(kvm_pit_state2))

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic: the kernel's spelling)

KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2
KVM_VCPUEVENT_VALID_SMM = 1 << 3
KVM_VCPUEVENT_VALID_PAYLOAD = 1 << 4
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 1 << 5
KVM_X86_SHADOW_INT_MOV_SS = 1 << 0
KVM_X86_SHADOW_INT_STI = 1 << 1

# x86 CPU state bits the kernel checks (arch/x86/include/asm/processor-flags.h, msr-index.h)
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_EM = 1 << 2
X86_CR0_TS = 1 << 3
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_AM = 1 << 18
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_EFER_SCE = 1 << 0
X86_EFER_LME = 1 << 8
X86_EFER_LMA = 1 << 10
X86_EFER_NX = 1 << 11
X86_RFLAGS_FIXED = 1 << 1
X86_RFLAGS_TF = 1 << 8
X86_RFLAGS_IF = 1 << 9
X86_RFLAGS_DF = 1 << 10
X86_RFLAGS_RF = 1 << 16
X86_RFLAGS_VM = 1 << 17
MSR_IA32_APICBASE_BSP = 1 << 8
MSR_IA32_APICBASE_ENABLE = 1 << 11
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
