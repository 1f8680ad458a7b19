"""<linux/kvm.h>: the architecture-neutral KVM ABI (constants, generic structs, ioctl numbers).

Layouts are ctypes structures with the kernel's field names; `tests/uapi` checks every size and
offset against the host's headers with gcc. Architecture structs live in `x86.py` (and `arm64.py`).
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any

from kvmlab.uapi.ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

# --- exit reasons (struct kvm_run.exit_reason) ---------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37
KVM_EXIT_MEMORY_FAULT = 39

EXIT_REASON_NAMES: dict[int, str] = {
    value: name.removeprefix("KVM_EXIT_")
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

# --- memory slots ------------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# --- vCPU mmap layout (x86 page offsets) ------------------------------------------------------
KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2

# --- mp_state -----------------------------------------------------------------------------------
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10

# --- guest debug control (generic bits; arch bits are in x86.py) -----------------------------
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002

# --- capabilities (KVM_CHECK_EXTENSION arguments) ---------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_MMU_SHADOW_CACHE_CONTROL = 2
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_VAPIC = 6
KVM_CAP_EXT_CPUID = 7
KVM_CAP_CLOCKSOURCE = 8
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_REINJECT_CONTROL = 24
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_INTR_SHADOW = 49
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_SYNC_REGS = 74
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_ARM_PSCI = 87
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_X86_TRIPLE_FAULT_EVENT = 218
KVM_CAP_VM_TYPES = 235

# --- generic structures -------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):  # noqa: N801 (kernel name)
    """KVM_SET_USER_MEMORY_REGION: slot (15:0 id, 31:16 address space), flags, GPA, size, HVA."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_dirty_log(ctypes.Structure):  # noqa: N801
    """KVM_GET_DIRTY_LOG: the kernel writes the slot's bitmap to the user pointer `dirty_bitmap`."""

    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_interrupt(ctypes.Structure):  # noqa: N801
    """KVM_INTERRUPT: the vector to inject (x86 userspace irqchip)."""

    _fields_ = [("irq", c_uint32)]


class kvm_mp_state(ctypes.Structure):  # noqa: N801
    """KVM_GET_MP_STATE / KVM_SET_MP_STATE."""

    _fields_ = [("mp_state", c_uint32)]


class kvm_one_reg(ctypes.Structure):  # noqa: N801
    """KVM_GET_ONE_REG / KVM_SET_ONE_REG: a register id and the address of its value."""

    _fields_ = [("id", c_uint64), ("addr", c_uint64)]


class kvm_reg_list(ctypes.Structure):  # noqa: N801
    """KVM_GET_REG_LIST's header: n, followed in memory by n u64 register ids."""

    _fields_ = [("n", c_uint64)]


class _IrqOrStatus(ctypes.Union):
    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class kvm_irq_level(ctypes.Structure):  # noqa: N801
    """KVM_IRQ_LINE: an interrupt line (its encoding is the arch's) and its new level.

    KVM_IRQ_LINE_STATUS writes back `status` over `irq`: >0 delivered, 0 coalesced (the line
    was already pending), -1 masked or no target.
    """

    _anonymous_ = ("u",)
    _fields_ = [("u", _IrqOrStatus), ("level", c_uint32)]


class kvm_irqfd(ctypes.Structure):  # noqa: N801
    """KVM_IRQFD: an eventfd whose signal raises `gsi` (DEASSIGN removes it)."""

    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):  # noqa: N801
    """KVM_IOEVENTFD: a guest write to `addr` (a port with FLAG_PIO) signals eventfd `fd`."""

    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IOEVENTFD_VALID_FLAG_MASK = (1 << 5) - 1

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_MAX_IRQ_ROUTES = 4096


class kvm_irq_routing_irqchip(ctypes.Structure):  # noqa: N801
    """A GSI routed to pin `pin` of in-kernel chip `irqchip` (0, 1: the PICs; 2: the IOAPIC)."""

    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):  # noqa: N801
    """A GSI routed to a message-signalled interrupt: the address and data of the write."""

    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("pad", c_uint32),
    ]


class kvm_irq_routing_s390_adapter(ctypes.Structure):  # noqa: N801
    """An s390 adapter route: never used on x86, but its 64-bit fields align the union."""

    _fields_ = [
        ("ind_addr", c_uint64),
        ("summary_addr", c_uint64),
        ("ind_offset", c_uint64),
        ("summary_offset", c_uint32),
        ("adapter_id", c_uint32),
    ]


class _RoutingUnion(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("adapter", kvm_irq_routing_s390_adapter),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):  # noqa: N801
    """One route of KVM_SET_GSI_ROUTING: `gsi` to the chip pin or MSI that `type` names."""

    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _RoutingUnion),
    ]


class kvm_irq_routing(ctypes.Structure):  # noqa: N801
    """KVM_SET_GSI_ROUTING: `nr` entries follow (use `flex(kvm_irq_routing, n)`)."""

    _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * 0)]


class kvm_msi(ctypes.Structure):  # noqa: N801
    """KVM_SIGNAL_MSI: inject the interrupt a device's MSI write of `data` to `address` makes."""

    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class kvm_run_io(ctypes.Structure):  # noqa: N801
    """kvm_run.io: a port access; data is count*size bytes at (char *)run + data_offset."""

    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):  # noqa: N801
    """kvm_run.mmio: an access to guest-physical memory outside every slot."""

    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class kvm_run_hw(ctypes.Structure):  # noqa: N801
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_fail_entry(ctypes.Structure):  # noqa: N801
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_ex(ctypes.Structure):  # noqa: N801
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_hypercall(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class kvm_run_internal(ctypes.Structure):  # noqa: N801
    """kvm_run.internal: KVM_EXIT_INTERNAL_ERROR's suberror and ndata words of data."""

    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_emulation_failure(ctypes.Structure):  # noqa: N801
    """The KVM_INTERNAL_ERROR_EMULATION overlay of kvm_run.internal."""

    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    ]


class kvm_run_system_event(ctypes.Structure):  # noqa: N801
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


def make_kvm_run(debug_exit_arch: type[ctypes.Structure], sync_regs: type[ctypes.Structure]) -> Any:
    """Build `struct kvm_run` for one architecture (only `debug.arch` and `s.regs` differ)."""

    class kvm_run_debug(ctypes.Structure):  # noqa: N801
        _fields_ = [("arch", debug_exit_arch)]

    class kvm_run_exit(ctypes.Union):  # noqa: N801
        _fields_ = [
            ("hw", kvm_run_hw),
            ("fail_entry", kvm_run_fail_entry),
            ("ex", kvm_run_ex),
            ("io", kvm_run_io),
            ("debug", kvm_run_debug),
            ("mmio", kvm_run_mmio),
            ("hypercall", kvm_run_hypercall),
            ("internal", kvm_run_internal),
            ("emulation_failure", kvm_run_emulation_failure),
            ("system_event", kvm_run_system_event),
            ("padding", c_char * 256),
        ]

    class kvm_run_s(ctypes.Union):  # noqa: N801
        _fields_ = [("regs", sync_regs), ("padding", c_char * 2048)]

    class kvm_run(ctypes.Structure):  # noqa: N801
        """The vCPU's shared page 0: what userspace asks of KVM_RUN and what KVM reports back."""

        _anonymous_ = ("exit",)
        _fields_ = [
            ("request_interrupt_window", c_uint8),
            ("immediate_exit", c_uint8),
            ("padding1", c_uint8 * 6),
            ("exit_reason", c_uint32),
            ("ready_for_interrupt_injection", c_uint8),
            ("if_flag", c_uint8),
            ("flags", c_uint16),
            ("cr8", c_uint64),
            ("apic_base", c_uint64),
            ("exit", kvm_run_exit),
            ("kvm_valid_regs", c_uint64),
            ("kvm_dirty_regs", c_uint64),
            ("s", kvm_run_s),
        ]

    return kvm_run


# --- ioctls on /dev/kvm -------------------------------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)

# --- ioctls on a VM fd --------------------------------------------------------------------------
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, ctypes.sizeof(kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.sizeof(c_uint64))
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, ctypes.sizeof(kvm_irq_level))
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, ctypes.sizeof(kvm_irq_level))
KVM_IRQFD = _IOW(KVMIO, 0x76, ctypes.sizeof(kvm_irqfd))
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, ctypes.sizeof(kvm_ioeventfd))
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, ctypes.sizeof(kvm_irq_routing))
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, ctypes.sizeof(kvm_msi))

# --- ioctls on a vCPU fd ------------------------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_INTERRUPT = _IOW(KVMIO, 0x86, ctypes.sizeof(kvm_interrupt))
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, ctypes.sizeof(kvm_mp_state))
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, ctypes.sizeof(kvm_mp_state))
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_GET_ONE_REG = _IOW(KVMIO, 0xAB, ctypes.sizeof(kvm_one_reg))
KVM_SET_ONE_REG = _IOW(KVMIO, 0xAC, ctypes.sizeof(kvm_one_reg))
KVM_GET_REG_LIST = _IOWR(KVMIO, 0xB0, ctypes.sizeof(kvm_reg_list))
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
