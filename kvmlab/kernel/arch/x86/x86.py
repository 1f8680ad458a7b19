"""arch/x86/kvm for the simulator: vCPU creation and reset, register ioctls, and KVM_RUN.

Functions carry the names of arch/x86/kvm/x86.c (Linux 6.12) and do what those do, in the same
order; the vendor half (vmx.c on Intel hardware) is `uc.py`, where Unicorn is the CPU.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/x86.c
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RFLAGS

from kvmlab.kernel import eventfd
from kvmlab.kernel.arch.x86 import cpuid as cpuid_mod
from kvmlab.kernel.arch.x86 import i8254 as x86_i8254
from kvmlab.kernel.arch.x86 import ioapic as x86_ioapic
from kvmlab.kernel.arch.x86 import irq as x86_irq
from kvmlab.kernel.arch.x86 import lapic as x86_lapic
from kvmlab.kernel.arch.x86 import uc as vendor
from kvmlab.kernel.arch.x86.cpu_state import GPR_BY_NUMBER, context_layout, svm_layout
from kvmlab.kernel.arch.x86.cpuid import GuestCpuid, kvm_cpuid, kvm_update_cpuid_runtime
from kvmlab.kernel.arch.x86.fpu import (
    fpu_reset,
    kvm_arch_vcpu_ioctl_get_fpu,
    kvm_arch_vcpu_ioctl_set_fpu,
)
from kvmlab.kernel.arch.x86.msr import (
    MSRS_TO_SAVE,
    MsrState,
    host_tsc,
    kvm_get_msr,
    kvm_get_msr_index_list,
    kvm_set_msr,
    msr_io,
)
from kvmlab.kernel.arch.x86.uc import VMX_EXIT_NAMES, UcVcpu
from kvmlab.kernel.arch.x86.uc_events import Event
from kvmlab.kernel.kvm_main import Kvm, KvmVcpu, kvm_exit, kvm_init
from kvmlab.kernel.signals import signal_pending
from kvmlab.kernel.trace import traced
from kvmlab.kernel.uaccess import copy_from_user, copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import (
    APIC_DEFAULT_PHYS_BASE,
    KVM_APIC_REG_SIZE,
    KVM_CAP_EXT_CPUID,
    KVM_CAP_GET_TSC_KHZ,
    KVM_CAP_HLT,
    KVM_CAP_IOEVENTFD_NO_LENGTH,
    KVM_CAP_IRQ_INJECT_STATUS,
    KVM_CAP_IRQ_ROUTING,
    KVM_CAP_IRQCHIP,
    KVM_CAP_IRQFD_RESAMPLE,
    KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_MP_STATE,
    KVM_CAP_NR_VCPUS,
    KVM_CAP_PIT,
    KVM_CAP_PIT2,
    KVM_CAP_PIT_STATE2,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_REINJECT_CONTROL,
    KVM_CAP_SET_GUEST_DEBUG,
    KVM_CAP_SET_IDENTITY_MAP_ADDR,
    KVM_CAP_SET_TSS_ADDR,
    KVM_CAP_SIGNAL_MSI,
    KVM_CAP_SYNC_MMU,
    KVM_CAP_SYNC_REGS,
    KVM_CAP_TSC_DEADLINE_TIMER,
    KVM_CAP_USER_NMI,
    KVM_CAP_VCPU_EVENTS,
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_DEBUG,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_MMIO,
    KVM_EXIT_SET_TPR,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_UNKNOWN,
    KVM_GET_CPUID2,
    KVM_GET_FPU,
    KVM_GET_IRQCHIP,
    KVM_GET_LAPIC,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_INJECT_BP,
    KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERRUPT,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_MAX_IRQ_ROUTES,
    KVM_MP_STATE_AP_RESET_HOLD,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
    KVM_NMI,
    KVM_NR_INTERRUPTS,
    KVM_PIO_PAGE_OFFSET,
    KVM_SET_CPUID2,
    KVM_SET_FPU,
    KVM_SET_GSI_ROUTING,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_IRQCHIP,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSC_KHZ,
    KVM_SET_TSS_ADDR,
    KVM_SET_VCPU_EVENTS,
    KVM_SIGNAL_MSI,
    KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
    KVM_SYNC_X86_VALID_FIELDS,
    KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_PAYLOAD,
    KVM_VCPUEVENT_VALID_SHADOW,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
    KVM_X86_SHADOW_INT_MOV_SS,
    KVM_X86_SHADOW_INT_STI,
    MSR_IA32_APICBASE_BSP,
    MSR_IA32_APICBASE_ENABLE,
    SEGMENT_NAMES,
    X86_CR0_CD,
    X86_CR0_ET,
    X86_CR0_NW,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    X86_EFER_LME,
    X86_RFLAGS_DF,
    X86_RFLAGS_FIXED,
    X86_RFLAGS_IF,
    X86_RFLAGS_RF,
    kvm_fpu,
    kvm_guest_debug,
    kvm_interrupt,
    kvm_mp_state,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_vcpu_events,
)

PAGE_SIZE = 4096
PIO_DATA_OFFSET = KVM_PIO_PAGE_OFFSET * PAGE_SIZE
KVM_MAX_VCPUS = 1024  # CONFIG_KVM_MAX_NR_VCPUS default
KVM_VCPU_ID_RATIO = 4
KVM_MAX_VCPU_IDS = KVM_MAX_VCPUS * KVM_VCPU_ID_RATIO
KVM_X86_DEFAULT_VM = 0
CR8_RESERVED_BITS = ~0xF & (2**64 - 1)
# CR4 bits valid for a guest with no CPUID set (VME..OSXMMEXCPT); the others need CPUID bits.
CR4_VALID_WITHOUT_CPUID = 0x7FF
DEFAULT_MAXPHYADDR = 36  # cpuid_maxphyaddr() when the guest has no CPUID leaf 0x80000008
X2APIC_ENABLE = 1 << 10
DB_VECTOR = 1
BP_VECTOR = 3
EPT_VIOLATION_FETCH_QUALIFICATION = 0x184  # fetch | linear address valid | translated
NMI_VECTOR = 2
DR6_ACTIVE_LOW = 0xFFFF0FF0
DR6_BS = 1 << 14
DR7_FIXED_1 = 0x400
GP_VECTOR = 13
VMX_IDENTITY_MAP_DEFAULT = 0xFFFBC000
TSC_TOLERANCE_PPM = 250
VCPU_EVENTS_FLAGS = (
    KVM_VCPUEVENT_VALID_NMI_PENDING
    | KVM_VCPUEVENT_VALID_SIPI_VECTOR
    | KVM_VCPUEVENT_VALID_SHADOW
    | KVM_VCPUEVENT_VALID_SMM
    | KVM_VCPUEVENT_VALID_PAYLOAD
    | KVM_VCPUEVENT_VALID_TRIPLE_FAULT
)


@dataclass
class KvmVcpuArch:
    """struct kvm_vcpu_arch: what KVM keeps for an x86 vCPU beside the CPU's own registers.

    Like KVM's `regs_avail`/`regs_dirty`, rip (and rax while an IN is pending) are cached here
    and written to the CPU only when needed: the common exit then costs no register writes.
    """

    hw: UcVcpu
    apic_base: int = 0
    cr8: int = 0
    mp_state: int = KVM_MP_STATE_RUNNABLE
    rip: int = 0
    rip_dirty: bool = False  # `rip` is newer than the CPU's
    new_entry: bool = True  # userspace moved rip or CS since the last entry
    rflags: int = X86_RFLAGS_FIXED
    rax_dirty: int | None = None  # an rax the CPU does not hold yet
    # the pending userspace-IO completion, as vcpu->arch.complete_userspace_io
    complete_userspace_io: Callable[[KvmVcpu], int] | None = None
    guest_debug: int = 0  # KVM_SET_GUEST_DEBUG control, 0 unless KVM_GUESTDBG_ENABLE
    interrupt: int | None = None  # vcpu->arch.interrupt: a KVM_INTERRUPT vector to inject
    interrupt_soft: bool = False  # ... raised by INT n (set through KVM_SET_VCPU_EVENTS)
    exception: Event | None = None  # a queued exception (INJECT_BP/DB, #GP from rdmsr, ...)
    last_exception: Event | None = None  # the last one injected: still reported, not pending
    guest_dr7: int = 0  # DR7 from KVM_SET_GUEST_DEBUG with USE_HW_BP
    nmi_pending: int = 0  # NMIs waiting (at most 2, as process_nmi allows)
    nmi_masked: bool = False
    shadow_kind: int = KVM_X86_SHADOW_INT_STI  # what an interrupt shadow is reported as
    cpuid: GuestCpuid = field(default_factory=GuestCpuid)
    msrs: MsrState = field(default_factory=MsrState)
    has_run: bool = False  # kvm_vcpu_has_run: CPUID is frozen from the first entry on
    tsc_khz: int = 0
    cui_linear_rip: int = 0
    pio_size: int = 0
    pio_next_rip: int = 0
    rep_prefixes: bytes = b""
    apic: x86_lapic.KvmLapic | None = None  # the in-kernel local APIC (KVM_CREATE_IRQCHIP)
    halt_wait: threading.Condition = field(default_factory=threading.Condition)
    # the emulator's read buffer (ctxt->mem_read): what a load no device answers gets
    mmio_read_buffer: bytearray = field(default_factory=lambda: bytearray(8))

    def guest_has_rdtscp(self) -> bool:
        found = self.cpuid.find(0x8000_0001, 0)
        return found is not None and bool(found[3] & (1 << 27))

    def set_efer(self, efer: int, host: bool) -> bool:
        """set_efer: reserved bits fail; the guest cannot toggle LME with paging on, and its
        LMA is the CPU's, not the value written."""
        if efer & ~EFER_VALID:
            return False
        sregs = kvm_sregs()
        cpu = self.hw.cpu
        cpu.get_sregs(sregs)
        if not host:
            if sregs.cr0 & X86_CR0_PG and (efer ^ sregs.efer) & X86_EFER_LME:
                return False
            efer = (efer & ~X86_EFER_LMA) | (sregs.efer & X86_EFER_LMA)
        sregs.efer = efer
        cpu.set_sregs(sregs)
        return True

    def set_apic_base(self, vcpu: KvmVcpu, value: int, host: bool) -> bool:
        """kvm_apic_set_base: reserved bits (x2APIC only if the guest's CPUID has it), the
        invalid mode, and from the guest no x2APIC -> xAPIC or disabled -> x2APIC step."""
        if value == self.apic_base:
            return True
        if not kvm_set_apic_base_valid(value, self.guest_has_x2apic()):
            return False
        old_mode, new_mode = apic_mode(self.apic_base), apic_mode(value)
        if not host and (old_mode, new_mode) in (("x2apic", "xapic"), ("disabled", "x2apic")):
            return False
        x86_lapic.kvm_lapic_set_base(vcpu, value)
        self.update_cpuid_runtime()
        return True

    def guest_has_x2apic(self) -> bool:
        found = self.cpuid.find(1, 0)
        return found is not None and bool(found[2] & (1 << 21))

    def update_cpuid_runtime(self) -> None:
        sregs = kvm_sregs()
        self.hw.cpu.get_sregs(sregs)
        enabled = bool(self.apic_base & MSR_IA32_APICBASE_ENABLE)
        kvm_update_cpuid_runtime(self.cpuid, enabled, sregs.cr4)


EFER_VALID = 0x1 | 0x100 | 0x400 | 0x800  # SCE, LME, LMA, NXE: what kvmlab's CPU offers


@dataclass
class KvmArchVm:
    """struct kvm_arch."""

    tss_addr: int = 0
    ept_identity_map_addr: int = VMX_IDENTITY_MAP_DEFAULT
    default_tsc_khz: int = 0
    irqchip: x86_irq.KvmIrqchip | None = None  # vpic, vioapic, routing (KVM_CREATE_IRQCHIP)
    vpit: Any = None  # the in-kernel 8254 (KVM_CREATE_PIT2)


def kvm_rip_read(vcpu: KvmVcpu) -> int:
    return vcpu.arch.rip


def kvm_rip_write(vcpu: KvmVcpu, rip: int) -> None:
    arch = vcpu.arch
    arch.rip, arch.rip_dirty = rip, True


def kvm_register_flush(vcpu: KvmVcpu) -> None:
    """Write the cached registers to the CPU before anything reads the CPU directly."""
    arch = vcpu.arch
    cpu = arch.hw.cpu
    if arch.rip_dirty:
        cpu.set_rip(arch.rip)
        arch.rip_dirty = False
    if arch.rax_dirty is not None:
        cpu.write_reg(UC_X86_REG_RAX, arch.rax_dirty)
        arch.rax_dirty = None


# --- VM ---------------------------------------------------------------------------------------


@traced(args=lambda kvm, type_: {"type": type_})
def kvm_arch_init_vm(kvm: Kvm, type_: int) -> None:
    if type_ != KVM_X86_DEFAULT_VM:  # kvm_is_vm_type_supported: only the default type here
        fail(errno.EINVAL)
    kvm.arch = KvmArchVm(default_tsc_khz=host_tsc_khz())


def apic_mode(apic_base: int) -> str:
    """kvm_apic_mode: disabled, xAPIC, x2APIC (or the invalid x2APIC-without-enable)."""
    if not apic_base & MSR_IA32_APICBASE_ENABLE:
        return "invalid" if apic_base & X2APIC_ENABLE else "disabled"
    return "x2apic" if apic_base & X2APIC_ENABLE else "xapic"


def kvm_arch_destroy_vm(kvm: Kvm) -> None:
    """Stop the in-kernel timers; the vCPUs' engines go with kvm_arch_vcpu_destroy."""
    x86_i8254.kvm_free_pit(kvm)


def kvm_vm_ioctl_check_extension(kvm: Kvm | None, cap: int) -> int:
    """x86's answers for the capabilities kvmlab implements; 0 for everything else."""
    if cap in (
        KVM_CAP_HLT,
        KVM_CAP_MP_STATE,
        KVM_CAP_SET_TSS_ADDR,
        KVM_CAP_SYNC_MMU,
        KVM_CAP_READONLY_MEM,
        KVM_CAP_USER_NMI,
        KVM_CAP_SET_GUEST_DEBUG,
    ):
        return 1
    if cap in (KVM_CAP_EXT_CPUID, KVM_CAP_VCPU_EVENTS, KVM_CAP_SET_IDENTITY_MAP_ADDR):
        return 1
    if cap in (KVM_CAP_GET_TSC_KHZ, KVM_CAP_IRQCHIP, KVM_CAP_IRQ_INJECT_STATUS):
        return 1
    if cap in (KVM_CAP_TSC_DEADLINE_TIMER, KVM_CAP_SIGNAL_MSI, KVM_CAP_IRQFD_RESAMPLE):
        return 1
    if cap == KVM_CAP_IOEVENTFD_NO_LENGTH:
        return 1
    if cap in (KVM_CAP_PIT, KVM_CAP_PIT2, KVM_CAP_PIT_STATE2, KVM_CAP_REINJECT_CONTROL):
        return 1
    if cap == KVM_CAP_IRQ_ROUTING:
        return KVM_MAX_IRQ_ROUTES
    if cap == KVM_CAP_SYNC_REGS:
        return KVM_SYNC_X86_VALID_FIELDS
    if cap == KVM_CAP_NR_VCPUS:
        return min(os.cpu_count() or 1, KVM_MAX_VCPUS)
    if cap == KVM_CAP_MAX_VCPUS:
        return KVM_MAX_VCPUS
    if cap == KVM_CAP_MAX_VCPU_ID:
        return KVM_MAX_VCPU_IDS
    return 0


def kvm_arch_dev_ioctl(cmd: int, arg: int) -> int:
    """The x86 ioctls of /dev/kvm: the CPU model and the MSR list; anything else EINVAL."""
    if cmd == KVM_GET_SUPPORTED_CPUID:
        return cpuid_mod.kvm_dev_ioctl_get_cpuid(arg)
    if cmd == KVM_GET_MSR_INDEX_LIST:
        return kvm_get_msr_index_list(arg, MSRS_TO_SAVE)
    fail(errno.EINVAL)


def kvm_arch_vm_ioctl(kvm: Kvm, cmd: int, arg: int) -> int:
    r = x86_i8254.kvm_arch_vm_ioctl_pit(kvm, cmd, arg)
    if r is not None:
        return r
    if cmd == KVM_CREATE_IRQCHIP:
        return x86_irq.kvm_vm_ioctl_create_irqchip(kvm)
    if cmd in (KVM_IRQ_LINE, KVM_IRQ_LINE_STATUS):
        return x86_irq.kvm_vm_ioctl_irq_line(kvm, arg, cmd == KVM_IRQ_LINE_STATUS)
    if cmd == KVM_SET_GSI_ROUTING:
        return x86_irq.kvm_vm_ioctl_set_gsi_routing(kvm, arg)
    if cmd == KVM_SIGNAL_MSI:
        return x86_irq.kvm_send_userspace_msi(kvm, arg)
    if cmd == KVM_GET_IRQCHIP:
        return x86_irq.kvm_vm_ioctl_get_irqchip(kvm, arg)
    if cmd == KVM_SET_IRQCHIP:
        return x86_irq.kvm_vm_ioctl_set_irqchip(kvm, arg)
    if cmd == KVM_SET_TSS_ADDR:
        return kvm_vm_ioctl_set_tss_addr(kvm, arg)
    if cmd == KVM_SET_IDENTITY_MAP_ADDR:
        with kvm.lock:
            if kvm.created_vcpus:
                fail(errno.EINVAL)
            raw = copy_from_user(arg, 8)
            kvm.arch.ept_identity_map_addr = int.from_bytes(raw, "little")
        return 0
    if cmd == KVM_GET_TSC_KHZ:
        return int(kvm.arch.default_tsc_khz)
    if cmd == KVM_SET_TSC_KHZ:
        khz = (arg & 0xFFFF_FFFF) or host_tsc_khz()
        with kvm.lock:
            if kvm.created_vcpus:
                fail(errno.EINVAL)
            kvm.arch.default_tsc_khz = khz
        return 0
    fail(errno.ENOTTY)


@functools.cache
def host_tsc_khz() -> int:
    """tsc_khz: the rate of the TSC the guest reads (the host's; Unicorn passes it through),
    as the host kernel reports it, else measured against CLOCK_MONOTONIC."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        if " constant_tsc" in text:
            for line in text.splitlines():
                if line.startswith("cpu MHz"):
                    return round(float(line.split(":")[1]) * 1000)
    t0, c0 = time.monotonic_ns(), host_tsc()
    time.sleep(0.02)
    t1, c1 = time.monotonic_ns(), host_tsc()
    return round((c1 - c0) * 1_000_000 / (t1 - t0))


@traced(args=lambda vcpu, khz: {"khz": khz})
def kvm_set_tsc_khz(vcpu: KvmVcpu, khz: int) -> None:
    """KVM_SET_TSC_KHZ without TSC scaling: a rate within 250 ppm of the host's, or above it
    (KVM then catches the guest's TSC up at each entry), is taken; a slower one is EINVAL."""
    khz &= 0xFFFF_FFFF
    host = host_tsc_khz()
    if khz == 0:
        khz = host
    if khz < host - host * TSC_TOLERANCE_PPM // 1_000_000:
        fail(errno.EINVAL)
    vcpu.arch.tsc_khz = khz


def kvm_vm_ioctl_set_tss_addr(kvm: Kvm, addr: int) -> int:
    """The three pages of the real-mode TSS must lie below 4 GiB."""
    if addr > (-3 * PAGE_SIZE) & 0xFFFFFFFF:
        fail(errno.EINVAL)
    kvm.arch.tss_addr = addr
    return 0


# --- vCPU creation and reset ------------------------------------------------------------------


@traced(args=lambda kvm, id_: {"id": id_})
def kvm_arch_vcpu_precreate(kvm: Kvm, id_: int) -> None:
    """x86 has nothing more to refuse here (max_vcpu_ids equals KVM_MAX_VCPU_IDS)."""


@traced()
def kvm_arch_vcpu_create(vcpu: KvmVcpu) -> None:
    arch = vcpu.arch = KvmVcpuArch(hw=UcVcpu(), tsc_khz=vcpu.kvm.arch.default_tsc_khz)
    arch.msrs.last_tsc_write = (0, host_tsc())  # kvm_synchronize_tsc(vcpu, 0) at creation
    cpuid = arch.cpuid
    arch.hw.cpuid = lambda function, index: kvm_cpuid(cpuid, function, index)
    if x86_irq.irqchip_in_kernel(vcpu.kvm):
        x86_lapic.kvm_create_lapic(vcpu)
    kvm_vcpu_reset(vcpu, init_event=False)
    bsp = vcpu.vcpu_id == 0  # kvm_vcpu_is_reset_bsp
    # with the APICs in the kernel, an AP waits for INIT and SIPI
    if arch.apic is not None and not bsp:
        arch.mp_state = KVM_MP_STATE_UNINITIALIZED


@traced()
def kvm_arch_vcpu_destroy(vcpu: KvmVcpu) -> None:
    if vcpu.arch is not None:
        x86_lapic.kvm_free_lapic(vcpu)
        vcpu.arch.hw.close()


@traced(args=lambda vcpu, init_event: {"init_event": init_event})
def kvm_vcpu_reset(vcpu: KvmVcpu, init_event: bool) -> None:
    """The architectural power-on state: real mode, CS:IP = f000:fff0, first fetch at 4G-16."""
    arch = vcpu.arch
    regs = kvm_regs(rdx=0x600, rip=0xFFF0, rflags=X86_RFLAGS_FIXED)
    sregs = kvm_sregs()
    for name in SEGMENT_NAMES:
        seg = getattr(sregs, name)
        seg.limit, seg.present, seg.s, seg.type = 0xFFFF, 1, 1, 3
    sregs.cs.selector, sregs.cs.base, sregs.cs.type = 0xF000, 0xFFFF0000, 0xB
    sregs.tr.s, sregs.tr.type = 0, 0xB
    sregs.ldt.s, sregs.ldt.type = 0, 2
    sregs.gdt.limit = sregs.idt.limit = 0xFFFF
    sregs.cr0 = X86_CR0_ET | X86_CR0_NW | X86_CR0_CD
    kvm_arch_vcpu_ioctl_set_regs(vcpu, regs)
    arch.hw.cpu.set_sregs(sregs)
    fpu_reset(arch.hw.cpu)
    arch.cr8 = 0
    if not init_event:  # INIT keeps the APIC base
        arch.apic_base = APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE
        if vcpu.vcpu_id == 0:  # kvm_vcpu_is_reset_bsp
            arch.apic_base |= MSR_IA32_APICBASE_BSP
    if arch.apic is not None:
        x86_lapic.kvm_lapic_reset(vcpu, init_event)
    arch.nmi_pending, arch.interrupt, arch.exception = 0, None, None
    arch.mp_state = KVM_MP_STATE_RUNNABLE


# --- register ioctls --------------------------------------------------------------------------


def kvm_arch_vcpu_ioctl(vcpu: KvmVcpu, cmd: int, arg: int) -> int:
    """The x86 vCPU ioctls; anything unknown is EINVAL."""
    if cmd == KVM_GET_REGS:
        regs = kvm_regs()
        kvm_arch_vcpu_ioctl_get_regs(vcpu, regs)
        copy_to_user(arg, regs)
        return 0
    if cmd == KVM_SET_REGS:
        kvm_arch_vcpu_ioctl_set_regs(vcpu, copy_struct_from_user(kvm_regs, arg))
        return 0
    if cmd == KVM_GET_SREGS:
        sregs = kvm_sregs()
        kvm_arch_vcpu_ioctl_get_sregs(vcpu, sregs)
        copy_to_user(arg, sregs)
        return 0
    if cmd == KVM_SET_SREGS:
        kvm_arch_vcpu_ioctl_set_sregs(vcpu, copy_struct_from_user(kvm_sregs, arg))
        return 0
    if cmd == KVM_INTERRUPT:
        kvm_vcpu_ioctl_interrupt(vcpu, copy_struct_from_user(kvm_interrupt, arg))
        return 0
    if cmd == KVM_SET_MP_STATE:
        kvm_arch_vcpu_ioctl_set_mpstate(vcpu, copy_struct_from_user(kvm_mp_state, arg))
        return 0
    if cmd == KVM_GET_LAPIC:
        if vcpu.arch.apic is None:
            fail(errno.EINVAL)
        copy_to_user(arg, x86_lapic.kvm_apic_get_state(vcpu))
        return 0
    if cmd == KVM_SET_LAPIC:
        if vcpu.arch.apic is None:
            fail(errno.EINVAL)
        x86_lapic.kvm_apic_set_state(vcpu, copy_from_user(arg, KVM_APIC_REG_SIZE))
        return 0
    if cmd == KVM_NMI:  # kvm_inject_nmi, then process_nmi's limit
        arch = vcpu.arch
        arch.nmi_pending = min(arch.nmi_pending + 1, 1 if arch.nmi_masked else 2)
        return 0
    if cmd == KVM_SET_GUEST_DEBUG:
        kvm_arch_vcpu_ioctl_set_guest_debug(vcpu, copy_struct_from_user(kvm_guest_debug, arg))
        return 0
    return kvm_arch_vcpu_ioctl_state(vcpu, cmd, arg)


def kvm_arch_vcpu_ioctl_state(vcpu: KvmVcpu, cmd: int, arg: int) -> int:
    """CPUID, MSRs, FPU, events and the TSC rate; anything unknown is EINVAL."""
    arch = vcpu.arch
    if cmd == KVM_SET_CPUID2:
        entries = cpuid_mod.kvm_vcpu_ioctl_set_cpuid2(arch.cpuid, arg, arch.has_run)
        arch.cpuid.replace(entries)
        if not arch.has_run:
            arch.update_cpuid_runtime()
        return 0
    if cmd == KVM_GET_CPUID2:
        cpuid_mod.kvm_vcpu_ioctl_get_cpuid2(arch.cpuid, arg)
        return 0
    if cmd in (KVM_GET_MSRS, KVM_SET_MSRS):
        kvm_register_flush(vcpu)
        return msr_io(vcpu, arg, write=cmd == KVM_SET_MSRS)
    if cmd == KVM_GET_FPU:
        fpu = kvm_fpu()
        kvm_arch_vcpu_ioctl_get_fpu(arch.hw.uc, fpu)
        copy_to_user(arg, fpu)
        return 0
    if cmd == KVM_SET_FPU:
        kvm_arch_vcpu_ioctl_set_fpu(arch.hw.uc, copy_struct_from_user(kvm_fpu, arg))
        return 0
    if cmd == KVM_GET_VCPU_EVENTS:
        events = kvm_vcpu_events()
        kvm_vcpu_ioctl_x86_get_vcpu_events(vcpu, events)
        copy_to_user(arg, events)
        return 0
    if cmd == KVM_SET_VCPU_EVENTS:
        kvm_vcpu_ioctl_x86_set_vcpu_events(vcpu, copy_struct_from_user(kvm_vcpu_events, arg))
        return 0
    if cmd == KVM_GET_TSC_KHZ:
        return int(arch.tsc_khz)
    if cmd == KVM_SET_TSC_KHZ:
        kvm_set_tsc_khz(vcpu, arg)
        return 0
    fail(errno.EINVAL)


@traced()
def kvm_vcpu_ioctl_x86_get_vcpu_events(vcpu: KvmVcpu, events: kvm_vcpu_events) -> None:
    """The events KVM holds for the vCPU: a queued exception, interrupt, NMIs, the shadow."""
    arch = vcpu.arch
    exc = arch.exception or arch.last_exception  # KVM keeps the vector once it is delivered
    if exc is not None:
        # without KVM_CAP_EXCEPTION_PAYLOAD: pending or injected
        events.exception.injected = int(arch.exception is not None)
        events.exception.nr = exc.vector
        events.exception.has_error_code = int(exc.error_code is not None)
        events.exception.error_code = exc.error_code or 0
    if arch.interrupt is not None:
        events.interrupt.injected = int(not arch.interrupt_soft)
        events.interrupt.nr = arch.interrupt
        events.interrupt.soft = int(arch.interrupt_soft)
    kvm_register_flush(vcpu)
    if arch.hw.cpu.interrupt_shadow():
        events.interrupt.shadow = arch.shadow_kind
    events.nmi.pending = arch.nmi_pending
    events.nmi.masked = int(arch.nmi_masked)
    events.flags = (
        KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM
    )


@traced(args=lambda vcpu, events: {"flags": events.flags})
def kvm_vcpu_ioctl_x86_set_vcpu_events(vcpu: KvmVcpu, events: kvm_vcpu_events) -> None:
    """Load the events: EINVAL for unknown flags, a payload (not enabled), an exception vector
    above 31 or NMI, SMM (kvmlab has none) and a triple fault (the capability is off)."""
    arch = vcpu.arch
    flags = events.flags
    if flags & ~VCPU_EVENTS_FLAGS or flags & KVM_VCPUEVENT_VALID_PAYLOAD:
        fail(errno.EINVAL)
    exc = events.exception
    if exc.injected and (exc.nr > 31 or exc.nr == NMI_VECTOR):
        fail(errno.EINVAL)
    smi = events.smi
    if flags & KVM_VCPUEVENT_VALID_SMM and (smi.smm or smi.pending or smi.smm_inside_nmi):
        fail(errno.EINVAL)
    if flags & KVM_VCPUEVENT_VALID_TRIPLE_FAULT:
        fail(errno.EINVAL)
    arch.exception = None
    if exc.injected:
        arch.exception = Event(exc.nr, exc.error_code if exc.has_error_code else None)
    intr = events.interrupt
    arch.interrupt = intr.nr if intr.injected or intr.soft else None
    arch.interrupt_soft = bool(intr.soft) and not intr.injected
    if flags & KVM_VCPUEVENT_VALID_SHADOW:
        kvm_register_flush(vcpu)
        shadow = intr.shadow & (KVM_X86_SHADOW_INT_MOV_SS | KVM_X86_SHADOW_INT_STI)
        arch.hw.cpu.set_interrupt_shadow(bool(shadow))
        if shadow:
            arch.shadow_kind = shadow
    if flags & KVM_VCPUEVENT_VALID_NMI_PENDING:
        arch.nmi_pending = min(events.nmi.pending, 1 if events.nmi.masked else 2)
    arch.nmi_masked = bool(events.nmi.masked)


@traced(args=lambda vcpu, irq: {"irq": irq.irq})
def kvm_vcpu_ioctl_interrupt(vcpu: KvmVcpu, irq: kvm_interrupt) -> None:
    """Queue an external interrupt vector; without an in-kernel PIC a second one overwrites."""
    if irq.irq >= KVM_NR_INTERRUPTS:
        fail(errno.EINVAL)
    if x86_irq.pic_in_kernel(vcpu.kvm):  # the PIC in the kernel is the only source
        fail(errno.ENXIO)
    vcpu.arch.interrupt = irq.irq


@traced(args=lambda vcpu, dbg: {"control": dbg.control})
def kvm_arch_vcpu_ioctl_set_guest_debug(vcpu: KvmVcpu, dbg: kvm_guest_debug) -> None:
    """Debug control from a debugger: single-step is what kvmlab implements so far.

    x86 ignores control bits it does not know; without KVM_GUESTDBG_ENABLE it is all off.
    """
    arch = vcpu.arch
    control = dbg.control
    if control & (KVM_GUESTDBG_INJECT_DB | KVM_GUESTDBG_INJECT_BP):
        if arch.exception is not None:
            fail(errno.EBUSY)
        arch.exception = Event(DB_VECTOR if control & KVM_GUESTDBG_INJECT_DB else BP_VECTOR)
    arch.guest_debug = control if control & KVM_GUESTDBG_ENABLE else 0
    arch.hw.intercept_bp = bool(arch.guest_debug & KVM_GUESTDBG_USE_SW_BP)
    breakpoints = []
    if arch.guest_debug & KVM_GUESTDBG_USE_HW_BP:
        dr7 = dbg.arch.debugreg[7]
        arch.guest_dr7 = dr7
        for n in range(4):  # enabled (Ln or Gn) execution breakpoints (R/Wn = 00)
            if dr7 & (3 << (2 * n)) and not (dr7 >> (16 + 4 * n)) & 3:
                breakpoints.append((n, dbg.arch.debugreg[n]))
    else:
        arch.guest_dr7 = 0
    arch.hw.set_hw_breakpoints(breakpoints)


@traced()
def kvm_arch_vcpu_ioctl_get_regs(vcpu: KvmVcpu, regs: kvm_regs) -> None:
    kvm_register_flush(vcpu)
    vcpu.arch.hw.cpu.get_regs(regs)


@traced(args=lambda vcpu, regs: {"rip": regs.rip})
def kvm_arch_vcpu_ioctl_set_regs(vcpu: KvmVcpu, regs: kvm_regs) -> None:
    """__set_regs: every register as given, except that RFLAGS bit 1 always reads as 1."""
    arch = vcpu.arch
    regs.rflags |= X86_RFLAGS_FIXED
    arch.hw.cpu.set_regs(regs)
    arch.rip, arch.rip_dirty, arch.rflags, arch.rax_dirty = regs.rip, False, regs.rflags, None
    arch.new_entry = True


@traced()
def kvm_arch_vcpu_ioctl_get_sregs(vcpu: KvmVcpu, sregs: kvm_sregs) -> None:
    arch = vcpu.arch
    kvm_register_flush(vcpu)
    arch.hw.cpu.get_sregs(sregs)
    sregs.cr8 = kvm_get_cr8(vcpu)
    sregs.apic_base = arch.apic_base
    if arch.interrupt is not None:  # a KVM_INTERRUPT vector not yet injected
        sregs.interrupt_bitmap[arch.interrupt // 64] |= 1 << (arch.interrupt % 64)


def kvm_is_valid_cr0(cr0: int) -> bool:
    if cr0 >> 32:
        return False
    if cr0 & X86_CR0_NW and not cr0 & X86_CR0_CD:
        return False
    return not (cr0 & X86_CR0_PG and not cr0 & X86_CR0_PE)


def kvm_is_valid_cr4(cr4: int) -> bool:
    return not cr4 & ~CR4_VALID_WITHOUT_CPUID


def kvm_is_valid_sregs(sregs: kvm_sregs) -> bool:
    """The consistency KVM_SET_SREGS demands before it loads anything."""
    if sregs.efer & X86_EFER_LME and sregs.cr0 & X86_CR0_PG:
        # 64-bit mode (perhaps with a 32-bit CS): PAE and LMA must be on, CR3 addressable.
        if not sregs.cr4 & X86_CR4_PAE or not sregs.efer & X86_EFER_LMA:
            return False
        if sregs.cr3 >> DEFAULT_MAXPHYADDR:
            return False
    elif sregs.efer & X86_EFER_LMA or sregs.cs.l:
        return False
    return kvm_is_valid_cr4(sregs.cr4) and kvm_is_valid_cr0(sregs.cr0)


def kvm_set_apic_base_valid(value: int, x2apic: bool) -> bool:
    """kvm_apic_set_base's checks: reserved bits (the x2APIC bit too unless the guest's CPUID
    has x2APIC), and not the invalid mode (x2APIC without the enable bit)."""
    reserved = (~((1 << DEFAULT_MAXPHYADDR) - 1) & (2**64 - 1)) | 0x2FF
    if not x2apic:
        reserved |= X2APIC_ENABLE
    return not value & reserved and apic_mode(value) != "invalid"


def kvm_set_cr8(vcpu: KvmVcpu, cr8: int) -> None:
    """CR8 is the APIC's task priority (TPR bits 7:4) when the APIC is in the kernel."""
    apic = vcpu.arch.apic
    if apic is None:
        vcpu.arch.cr8 = cr8
        return
    x86_lapic.kvm_lapic_reg_write(apic, x86_lapic.APIC_TASKPRI, (cr8 & 15) << 4)


def kvm_get_cr8(vcpu: KvmVcpu) -> int:
    apic = vcpu.arch.apic
    if apic is None:
        return int(vcpu.arch.cr8)
    return (apic.get(x86_lapic.APIC_TASKPRI) & 0xF0) >> 4


@traced(args=lambda vcpu, s: {"cr0": s.cr0, "efer": s.efer})
def kvm_arch_vcpu_ioctl_set_sregs(vcpu: KvmVcpu, sregs: kvm_sregs) -> None:
    """__set_sregs: validate, then load; VMX details (accessed bit, unusable) as on hardware."""
    arch = vcpu.arch
    if not kvm_is_valid_sregs(sregs):
        fail(errno.EINVAL)
    if not kvm_set_apic_base_valid(sregs.apic_base, arch.guest_has_x2apic()):
        fail(errno.EINVAL)
    x86_lapic.kvm_lapic_set_base(vcpu, sregs.apic_base)
    if not sregs.cr8 & CR8_RESERVED_BITS:
        kvm_set_cr8(vcpu, sregs.cr8)
    for name in SEGMENT_NAMES:
        vmx_fixup_segment(getattr(sregs, name), name)
    kvm_register_flush(vcpu)
    arch.hw.cpu.set_sregs(sregs)
    arch.new_entry = True
    if arch.cpuid.entries:
        arch.update_cpuid_runtime()


def vmx_fixup_segment(seg: Any, name: str) -> None:
    """What VMX's access-rights encoding does to a segment written by KVM_SET_SREGS.

    An unusable or non-present segment reads back as unusable with empty attributes; with
    unrestricted guest the accessed bit of every usable segment but LDTR is forced on.
    """
    if seg.unusable or not seg.present:
        seg.unusable, seg.present = 1, 0
        seg.type = seg.s = seg.dpl = seg.avl = seg.l = seg.db = seg.g = 0
    elif name != "ldt":
        seg.type |= 1


def kvm_arch_vcpu_ioctl_get_mpstate(vcpu: KvmVcpu) -> int:
    kvm_apic_accept_events(vcpu)
    return vcpu.arch.mp_state


MP_STATES_NEEDING_LAPIC = (
    KVM_MP_STATE_UNINITIALIZED,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_AP_RESET_HOLD,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_SIPI_RECEIVED,
)


@traced(args=lambda vcpu, mp: {"mp_state": mp.mp_state})
def kvm_arch_vcpu_ioctl_set_mpstate(vcpu: KvmVcpu, mp: kvm_mp_state) -> None:
    """Only RUNNABLE without an in-kernel APIC; with one, also the halted and INIT/SIPI
    states (SIPI_RECEIVED is kept as INIT_RECEIVED with a SIPI pending)."""
    state = mp.mp_state
    if state in MP_STATES_NEEDING_LAPIC:
        if not x86_irq.lapic_in_kernel(vcpu):
            fail(errno.EINVAL)
    elif state != KVM_MP_STATE_RUNNABLE:
        fail(errno.EINVAL)
    arch = vcpu.arch
    if state == KVM_MP_STATE_SIPI_RECEIVED:
        assert arch.apic is not None
        arch.mp_state, arch.apic.pending_sipi = KVM_MP_STATE_INIT_RECEIVED, True
    else:
        arch.mp_state = state


@traced()
def kvm_apic_accept_events(vcpu: KvmVcpu) -> None:
    """Events the APIC holds for the vCPU: INIT resets it (an AP then waits for a SIPI, the
    BSP runs on); a SIPI starts a waiting AP in real mode at the vector's page."""
    arch = vcpu.arch
    apic = arch.apic
    if apic is None or not (apic.pending_init or apic.pending_sipi):
        return
    with apic.lock:
        init, sipi, vector = apic.pending_init, apic.pending_sipi, apic.sipi_vector
        apic.pending_init = apic.pending_sipi = False
    if init:
        kvm_vcpu_reset(vcpu, init_event=True)
        bsp = arch.apic_base & MSR_IA32_APICBASE_BSP
        arch.mp_state = KVM_MP_STATE_RUNNABLE if bsp else KVM_MP_STATE_INIT_RECEIVED
    if sipi and arch.mp_state == KVM_MP_STATE_INIT_RECEIVED:
        kvm_vcpu_deliver_sipi_vector(vcpu, vector)
        arch.mp_state = KVM_MP_STATE_RUNNABLE


def kvm_vcpu_deliver_sipi_vector(vcpu: KvmVcpu, vector: int) -> None:
    """CS = vector << 8 (base vector << 12), rip 0."""
    kvm_register_flush(vcpu)
    sregs = kvm_sregs()
    cpu = vcpu.arch.hw.cpu
    cpu.get_sregs(sregs)
    sregs.cs.selector, sregs.cs.base = vector << 8, vector << 12
    cpu.set_sregs(sregs)
    kvm_rip_write(vcpu, 0)
    vcpu.arch.new_entry = True


# --- KVM_RUN ----------------------------------------------------------------------------------


# kvm_run read and written with struct, one call per group of fields: this is the hot path,
# and a ctypes attribute costs as much as a whole pack. The offsets are kvm_run's (uapi).
_RUN_IN = struct.Struct("<BB")  # request_interrupt_window, immediate_exit @0
_RUN_CR8 = struct.Struct("<Q")  # cr8 @16
_RUN_SYNC = struct.Struct("<QQ")  # kvm_valid_regs, kvm_dirty_regs @288
_RUN_OUT = struct.Struct("<BBHQQ")  # ready_for_interrupt_injection .. apic_base @12
_RUN_EXIT_REASON = struct.Struct("<I")  # @8
_RUN_IO = struct.Struct("<BBHIQ")  # io.direction, size, port, count, data_offset @32
assert kvm_run.kvm_valid_regs.offset == 288 and kvm_run.ready_for_interrupt_injection.offset == 12
assert kvm_run.io.offset == 32 and kvm_run.cr8.offset == 16


@traced()
def kvm_arch_vcpu_ioctl_run(vcpu: KvmVcpu) -> int:
    """KVM_RUN: finish the last exit's IO, then run until the next exit userspace must see."""
    shared = vcpu.run_map
    arch: KvmVcpuArch = vcpu.arch
    try:
        if arch.mp_state == KVM_MP_STATE_UNINITIALIZED:
            kvm_run_uninitialized(vcpu)
        valid, dirty = _RUN_SYNC.unpack_from(shared, 288)
        if (valid | dirty) & ~KVM_SYNC_X86_VALID_FIELDS:
            fail(errno.EINVAL)
        if dirty:
            sync_regs(vcpu)
        if not x86_irq.lapic_in_kernel(vcpu):
            (cr8,) = _RUN_CR8.unpack_from(shared, 16)
            if cr8 & CR8_RESERVED_BITS:  # kvm_set_cr8 from kvm_run without an in-kernel APIC
                fail(errno.EINVAL)
            arch.cr8 = cr8
        cui = arch.complete_userspace_io
        if cui is not None:
            arch.complete_userspace_io = None
            if cui(vcpu) <= 0:
                return 0
        if shared[1]:  # immediate_exit
            fail(errno.EINTR)
        vcpu_run(vcpu)
    finally:
        if _RUN_SYNC.unpack_from(shared, 288)[0]:
            store_regs(vcpu)
        post_kvm_run_save(vcpu)
    return 0


def kvm_run_uninitialized(vcpu: KvmVcpu) -> None:
    """KVM_RUN on a vCPU still waiting for INIT: block until an event or a signal comes,
    then return EAGAIN (EINTR for a signal or with immediate_exit), as KVM does."""
    if vcpu.run_map[1]:
        fail(errno.EINTR)
    kvm_vcpu_block(vcpu)
    kvm_apic_accept_events(vcpu)
    if signal_pending(vcpu):
        vcpu.stat.signal_exits += 1
        _RUN_EXIT_REASON.pack_into(vcpu.run_map, 8, KVM_EXIT_INTR)
        fail(errno.EINTR)
    fail(errno.EAGAIN)


def kvm_arch_vcpu_runnable(vcpu: KvmVcpu) -> bool:
    """Running, or an event that ends a halt: an NMI, a SIPI, an interrupt IF lets in."""
    arch = vcpu.arch
    if arch.mp_state == KVM_MP_STATE_RUNNABLE or arch.nmi_pending:
        return True
    if x86_lapic.kvm_apic_has_pending_init_or_sipi(vcpu):
        return True
    return bool(arch.rflags & X86_RFLAGS_IF) and x86_irq.kvm_cpu_has_interrupt(vcpu)


HALT_POLL = 0.005  # seconds: how often a blocked vCPU looks for a signal


@traced()
def kvm_vcpu_block(vcpu: KvmVcpu) -> None:
    """Sleep until the vCPU is runnable, or a kick or a signal wakes it (which the caller
    then serves: an EINTR exit for a signal, else back to sleep)."""
    arch = vcpu.arch
    hw = arch.hw
    with arch.halt_wait:
        while not kvm_arch_vcpu_runnable(vcpu) and not hw.kick_requested:
            arch.halt_wait.wait(HALT_POLL)
    hw.kick_requested = False


@traced()
def kvm_vcpu_halt(vcpu: KvmVcpu) -> None:
    """The halt-polling front of kvm_vcpu_block (kvmlab does not poll)."""
    kvm_vcpu_block(vcpu)


@traced()
def vcpu_block(vcpu: KvmVcpu) -> int:
    """A halted (or INIT-waiting) vCPU sleeps in KVM_RUN; woken by an event it runs again."""
    arch = vcpu.arch
    if not kvm_arch_vcpu_runnable(vcpu):
        if arch.mp_state == KVM_MP_STATE_HALTED:
            kvm_vcpu_halt(vcpu)
        else:
            kvm_vcpu_block(vcpu)
        if not kvm_arch_vcpu_runnable(vcpu):
            return 1  # a signal or a kick: vcpu_run serves it, then blocks again
    kvm_apic_accept_events(vcpu)
    if arch.mp_state in (KVM_MP_STATE_HALTED, KVM_MP_STATE_AP_RESET_HOLD):
        arch.mp_state = KVM_MP_STATE_RUNNABLE
    return 1


@traced()
def vcpu_run(vcpu: KvmVcpu) -> None:
    """Enter the guest again and again until an exit must go to userspace (or a signal)."""
    run: Any = vcpu.run
    arch = vcpu.arch
    _RUN_EXIT_REASON.pack_into(vcpu.run_map, 8, KVM_EXIT_UNKNOWN)
    pic = x86_irq.pic_in_kernel(vcpu.kvm)
    while True:
        running = arch.mp_state == KVM_MP_STATE_RUNNABLE  # kvm_vcpu_running
        r = vcpu_enter_guest(vcpu) if running else vcpu_block(vcpu)
        if r <= 0:
            return
        if not pic and vcpu.run_map[0] and kvm_vcpu_ready_for_interrupt_injection(vcpu):
            vcpu.stat.request_irq_exits += 1
            run.exit_reason = KVM_EXIT_IRQ_WINDOW_OPEN
            return
        if signal_pending(vcpu):
            vcpu.stat.signal_exits += 1
            run.exit_reason = KVM_EXIT_INTR  # kvm_handle_signal_exit
            fail(errno.EINTR)


@traced()
def vcpu_enter_guest(vcpu: KvmVcpu) -> int:
    """One trip into the guest and back: >0 means re-enter, 0 means exit to userspace."""
    arch = vcpu.arch
    hw = arch.hw
    slots = vcpu.kvm.memslots[0]
    if hw.generation != slots.generation or not hw.backing_intact():
        hw.load_memslots(slots)
    else:
        hw.invalidate_stale_code()
    if arch.rax_dirty is not None:
        kvm_register_flush(vcpu)
    if arch.new_entry:  # userspace set rip or CS: note the code page it points to
        kvm_register_flush(vcpu)
        hw.remember_code_at(hw.cpu.code_linear(arch.rip))
        arch.new_entry = False
    exit_reason = None
    arch.has_run = True
    pic = x86_irq.pic_in_kernel(vcpu.kvm)
    want_window = pic and kvm_check_and_inject_events(vcpu)
    if arch.nmi_pending or arch.interrupt is not None or arch.exception is not None:
        exit_reason = inject_pending_event(vcpu)
    if exit_reason is None:
        guest_lock = vcpu.kvm.guest_lock
        guest_lock.acquire(vcpu)
        try:
            exit_reason = hw.vcpu_run(
                arch.rip,
                step=bool(arch.guest_debug & KVM_GUESTDBG_SINGLESTEP),
                irq_window=want_window
                or (not pic and bool(vcpu.run_map[0]) and arch.interrupt is None),
            )
        except BaseException:
            # A Python signal handler raised (Ctrl-C, a notebook interrupt) while the guest
            # ran: the CPU holds the truth, and the exit is a signal exit, as on the host.
            arch.rip, arch.rip_dirty = hw.cpu.rip, False
            arch.rflags = hw.cpu.read_reg(UC_X86_REG_RFLAGS)
            _RUN_EXIT_REASON.pack_into(vcpu.run_map, 8, KVM_EXIT_INTR)
            raise
        finally:
            guest_lock.release()
        if exit_reason == vendor.EXIT_REASON_EXTERNAL_INTERRUPT:
            time.sleep(0)  # kicked, perhaps for another vCPU's turn: let it take the CPU
    arch.rip, arch.rip_dirty, arch.rflags = hw.rip, False, hw.rflags
    vcpu.stat.exits += 1
    return handle_exit(vcpu, exit_reason)


def kvm_check_and_inject_events(vcpu: KvmVcpu) -> bool:
    """With the irqchip in the kernel: take the PIC's vector if the guest can take it now
    (it is then injected like a KVM_INTERRUPT one); if not, ask for the interrupt window.
    Returns True when the window is needed."""
    arch = vcpu.arch
    if arch.interrupt is not None or arch.exception is not None or arch.nmi_pending:
        return False
    if not x86_irq.kvm_cpu_has_interrupt(vcpu):
        return False
    kvm_register_flush(vcpu)
    if not arch.rflags & X86_RFLAGS_IF or arch.hw.cpu.interrupt_shadow():
        return True  # enable_irq_window
    arch.interrupt, arch.interrupt_soft = x86_irq.kvm_cpu_get_interrupt(vcpu), False
    return False


@traced()
def inject_pending_event(vcpu: KvmVcpu) -> int | None:
    """Deliver a queued NMI or KVM_INTERRUPT vector as VM entry does (IF is not checked)."""
    arch = vcpu.arch
    if not arch.nmi_pending and arch.interrupt is None and arch.exception is None:
        return None
    kvm_register_flush(vcpu)
    if arch.exception is not None:
        event, arch.exception = arch.exception, None
        arch.last_exception = event
    elif arch.nmi_pending:
        arch.nmi_pending -= 1
        event = Event(NMI_VECTOR, external=True)
    else:
        assert arch.interrupt is not None
        soft = arch.interrupt_soft
        event = Event(arch.interrupt, software=soft, external=not soft)
        arch.interrupt, arch.interrupt_soft = None, False
    reason = arch.hw.inject(event)
    arch.rip = arch.hw.cpu.rip
    return reason


@traced(
    "vmx_handle_exit",
    args=lambda vcpu, exit_reason: {"exit_reason": VMX_EXIT_NAMES.get(exit_reason, exit_reason)},
)
def handle_exit(vcpu: KvmVcpu, exit_reason: int) -> int:
    """vmx_handle_exit: dispatch on the hardware exit reason."""
    if exit_reason == vendor.EXIT_REASON_IO_INSTRUCTION:
        return handle_io(vcpu)
    if exit_reason == vendor.EXIT_REASON_HLT:
        return kvm_emulate_halt(vcpu)
    if exit_reason == vendor.EXIT_REASON_MONITOR_TRAP_FLAG:
        return kvm_vcpu_do_singlestep(vcpu)  # one instruction retired under single-step
    if exit_reason == vendor.EXIT_REASON_INTERRUPT_WINDOW:
        vcpu.stat.irq_window_exits += 1
        return 1  # handle_interrupt_window: vcpu_run then reports IRQ_WINDOW_OPEN
    if exit_reason == vendor.EXIT_REASON_TRIPLE_FAULT:
        vcpu.run.exit_reason = KVM_EXIT_SHUTDOWN  # handle_triple_fault
        return 0
    if exit_reason == vendor.EXIT_REASON_EFAULT:
        fail(errno.EFAULT)  # the host memory behind a slot is not mapped (VMX; PVM gives MMIO)
    if exit_reason == vendor.EXIT_REASON_DELIVERY_UNSUPPORTED:
        return handle_unsupported_delivery(vcpu)
    if exit_reason == vendor.EXIT_REASON_EXTERNAL_INTERRUPT:
        return 1  # a kick: back to vcpu_run, which looks for signals and requests
    if exit_reason == vendor.EXIT_REASON_EPT_MISCONFIG:
        return handle_ept_misconfig(vcpu)
    if exit_reason == vendor.EXIT_REASON_CR_ACCESS:
        return handle_cr(vcpu)
    if exit_reason == vendor.EXIT_REASON_MSR_READ:
        return kvm_emulate_rdmsr(vcpu)
    if exit_reason == vendor.EXIT_REASON_MSR_WRITE:
        return kvm_emulate_wrmsr(vcpu)
    if exit_reason == vendor.EXIT_REASON_EPT_VIOLATION:
        return handle_emulation_failure(vcpu)
    return handle_exception_nmi(vcpu)


@traced()
def handle_io(vcpu: KvmVcpu) -> int:
    """IN/OUT: KVM's fast PIO path. The exit reports the instruction as not yet executed; the
    next KVM_RUN retires it (complete_fast_pio_in/out), unless userspace moved rip."""
    arch = vcpu.arch
    io = arch.hw.io
    if io.string:
        return handle_string_io(vcpu)
    value = x86_irq.kernel_pio(vcpu, io.port, io.size, io.is_in, io.value)
    if value is not None:  # an in-kernel device answered: no exit
        if io.is_in:
            mask = (1 << (8 * io.size)) - 1
            arch.rax_dirty = value if io.size == 4 else (io.rax & ~mask) | (value & mask)
        return kvm_skip_emulated_instruction(vcpu, io.next_rip)
    shared = vcpu.run_map
    size = io.size
    report_io_exit(vcpu, io.is_in, size, io.port, 1)
    arch.cui_linear_rip = arch.rip = io.insn_rip
    arch.rip_dirty = True  # the CPU is already past the instruction
    arch.pio_size, arch.pio_next_rip = size, io.next_rip
    if io.is_in:
        shared[PIO_DATA_OFFSET : PIO_DATA_OFFSET + size] = bytes(size)
        arch.rax_dirty = io.rax  # Unicorn already merged a placeholder into rax
        arch.complete_userspace_io = complete_fast_pio_in
    else:
        shared[PIO_DATA_OFFSET : PIO_DATA_OFFSET + size] = io.value.to_bytes(size, "little")
        arch.complete_userspace_io = complete_fast_pio_out
    return 0


def report_io_exit(vcpu: KvmVcpu, is_in: bool, size: int, port: int, count: int) -> None:
    """KVM_EXIT_IO in kvm_run: direction, size, port, count, and the data on the PIO page."""
    vcpu.stat.io_exits += 1
    _RUN_EXIT_REASON.pack_into(vcpu.run_map, 8, KVM_EXIT_IO)
    _RUN_IO.pack_into(vcpu.run_map, 32, not is_in, size, port, count, PIO_DATA_OFFSET)


@traced("kvm_emulate_instruction")
def handle_string_io(vcpu: KvmVcpu) -> int:
    """OUTS and INS go through KVM's instruction emulator.

    OUTS: Unicorn has done one element; it is reported with count 1, rip staying on a REP
    instruction until rcx reaches 0, as the emulator does. INS: the emulator reads ahead, so
    one exit asks for count = min(rcx, 1024 / size, bytes left in rdi's page) elements, and the
    next KVM_RUN stores them (complete_emulated_pio_ins).
    """
    arch = vcpu.arch
    io = arch.hw.io
    if not io.is_in:
        report_io_exit(vcpu, False, io.size, io.port, 1)
        vcpu.run_map[PIO_DATA_OFFSET : PIO_DATA_OFFSET + io.size] = io.value.to_bytes(
            io.size, "little"
        )
        if io.rep:
            rep_string_exit(vcpu, io.insn_rip, io.insn_rip + len(io.prefixes) + 1, io.prefixes)
        return 0
    kvm_register_flush(vcpu)
    regs, sregs = kvm_regs(), kvm_sregs()
    arch.hw.cpu.get_regs(regs)
    arch.hw.cpu.get_sregs(sregs)
    amask = _address_mask(sregs, 0x67 in io.prefixes)
    rdi = regs.rdi & amask
    count = 1
    if io.rep:
        down = regs.rflags & X86_RFLAGS_DF
        in_page = (rdi & (PAGE_SIZE - 1)) if down else PAGE_SIZE - (rdi & (PAGE_SIZE - 1))
        count = max(min(in_page, 1024 // io.size, regs.rcx & amask), 1)
    report_io_exit(vcpu, True, io.size, io.port, count)
    vcpu.run_map[PIO_DATA_OFFSET : PIO_DATA_OFFSET + count * io.size] = bytes(count * io.size)
    arch.pio_size = io.size
    arch.pio_next_rip = io.insn_rip + len(io.prefixes) + 1
    arch.complete_userspace_io = complete_emulated_pio_ins
    return 0


def rep_string_exit(vcpu: KvmVcpu, insn_rip: int, next_rip: int, prefixes: bytes) -> None:
    """A REP string instruction exits after writing an element, as KVM's emulator does it:
    rip stays on the instruction (even after the last element) with RFLAGS.RF set, and the
    next KVM_RUN moves on only once rcx is 0."""
    arch = vcpu.arch
    kvm_register_flush(vcpu)
    arch.rip, arch.rip_dirty = insn_rip, True
    arch.rflags |= X86_RFLAGS_RF
    arch.hw.cpu.write_reg(UC_X86_REG_RFLAGS, arch.rflags)
    arch.pio_next_rip = next_rip
    arch.rep_prefixes = prefixes
    arch.complete_userspace_io = complete_rep_string


@traced("complete_emulated_pio")
def complete_rep_string(vcpu: KvmVcpu) -> int:
    """Retire the REP instruction if its count ran out; otherwise the guest repeats it."""
    arch = vcpu.arch
    cpu = arch.hw.cpu
    kvm_register_flush(vcpu)
    sregs = kvm_sregs()
    cpu.get_sregs(sregs)
    if cpu.read_reg(UC_X86_REG_RCX) & _address_mask(sregs, 0x67 in arch.rep_prefixes) == 0:
        arch.rflags &= ~X86_RFLAGS_RF
        cpu.write_reg(UC_X86_REG_RFLAGS, arch.rflags)
        kvm_rip_write(vcpu, arch.pio_next_rip)
    return 1


def _address_mask(sregs: kvm_sregs, override: bool) -> int:
    """The address size of a string instruction: from the mode, flipped by a 0x67 prefix."""
    if sregs.efer & X86_EFER_LMA and sregs.cs.l:
        bits = 32 if override else 64
    else:
        wide = bool(sregs.cr0 & X86_CR0_PE and sregs.cs.db)
        bits = 32 if wide != override else 16
    return (1 << bits) - 1


@traced()
def complete_emulated_pio_ins(vcpu: KvmVcpu) -> int:
    """Store the INS data at ES:rdi, step rdi (and rcx for REP), and retire it when done."""
    arch = vcpu.arch
    io = arch.hw.io
    cpu = arch.hw.cpu
    kvm_register_flush(vcpu)
    regs, sregs = kvm_regs(), kvm_sregs()
    cpu.get_regs(regs)
    cpu.get_sregs(sregs)
    run: Any = vcpu.run
    size, count = arch.pio_size, run.io.count
    amask = _address_mask(sregs, 0x67 in io.prefixes)
    step = -size if regs.rflags & X86_RFLAGS_DF else size
    base = 0 if sregs.efer & X86_EFER_LMA and sregs.cs.l else sregs.es.base
    rdi = regs.rdi & amask
    for i in range(count):
        data = vcpu.run_map[PAGE_SIZE + i * size : PAGE_SIZE + (i + 1) * size]
        cpu.write_virtual(base + ((rdi + i * step) & amask), data)
    regs.rdi = (regs.rdi & ~amask) | ((rdi + count * step) & amask)
    done = True
    if io.rep:
        rcx = ((regs.rcx & amask) - count) & amask
        regs.rcx = (regs.rcx & ~amask) | rcx
        done = rcx == 0
    if done:
        regs.rip = arch.pio_next_rip
    cpu.set_regs(regs)
    arch.rip, arch.rip_dirty = regs.rip, False
    return 1


@traced()
def complete_fast_pio_out(vcpu: KvmVcpu) -> int:
    """Retire the OUT: skip it, unless userspace moved rip meanwhile."""
    arch = vcpu.arch
    if arch.rip != arch.cui_linear_rip:
        return 1
    return kvm_skip_emulated_instruction(vcpu, arch.pio_next_rip)


def kvm_skip_emulated_instruction(vcpu: KvmVcpu, next_rip: int) -> int:
    """Move past an instruction KVM finished; when single-stepping, that step ends here."""
    kvm_rip_write(vcpu, next_rip)
    if vcpu.arch.guest_debug & KVM_GUESTDBG_SINGLESTEP:
        return kvm_vcpu_do_singlestep(vcpu)
    return 1


def kvm_vcpu_do_singlestep(vcpu: KvmVcpu) -> int:
    """KVM_EXIT_DEBUG for a completed single step: #DB with DR6.BS, pc = the next rip."""
    kvm_register_flush(vcpu)
    return kvm_debug_exit(vcpu, DB_VECTOR, DR6_BS)


def kvm_debug_exit(vcpu: KvmVcpu, vector: int, dr6_bits: int) -> int:
    """Fill KVM_EXIT_DEBUG: the vector, the linear rip, DR6 and the guest's DR7 (as VMX does)."""
    arch = vcpu.arch
    run: Any = vcpu.run
    run.exit_reason = KVM_EXIT_DEBUG
    run.debug.arch.exception = vector
    run.debug.arch.pc = arch.hw.cpu.code_linear(arch.rip)
    run.debug.arch.dr6 = DR6_ACTIVE_LOW | dr6_bits
    run.debug.arch.dr7 = DR7_FIXED_1 | arch.guest_dr7
    return 0


@traced()
def complete_fast_pio_in(vcpu: KvmVcpu) -> int:
    """Retire the IN with userspace's data: merge below 4 bytes, zero-extend at 4, skip it."""
    arch = vcpu.arch
    if arch.rip != arch.cui_linear_rip:
        return 1
    size = arch.pio_size
    data = int.from_bytes(vcpu.run_map[PAGE_SIZE : PAGE_SIZE + size], "little")
    if size < 4:
        rax = arch.rax_dirty
        if rax is None:
            rax = arch.hw.cpu.read_reg(UC_X86_REG_RAX)
        mask = (1 << (8 * size)) - 1
        data |= rax & ~mask
    arch.rax_dirty = data
    return kvm_skip_emulated_instruction(vcpu, arch.pio_next_rip)


@traced()
def handle_ept_misconfig(vcpu: KvmVcpu) -> int:
    """An access where no memory slot is: KVM_EXIT_MMIO.

    A read exits before the instruction completes (rip on it) and finishes on the next
    KVM_RUN with run->mmio.data; a write exits after it (rip past it) with the data stored.
    """
    arch = vcpu.arch
    m = arch.hw.mmio
    run: Any = vcpu.run
    data = bytes(m.data[: m.size])
    handled = kernel_mmio(vcpu, m.gpa, m.size, m.is_write, data)
    if handled is not None:
        return handled
    rep = arch.hw.rep_string_at(arch.hw.mmio_insn_rip) if m.is_write else None
    ioeventfd = m.gpa in vcpu.kvm.buses[eventfd.KVM_MMIO_BUS]  # one registered here at all?
    store = m.is_write and rep is None
    if (
        ioeventfd
        and store
        and eventfd.kvm_io_bus_write(vcpu.kvm, eventfd.KVM_MMIO_BUS, m.gpa, data)
    ):
        return 1  # an ioeventfd took the store: no exit
    vcpu.stat.mmio_exits += 1
    run.exit_reason = KVM_EXIT_MMIO
    run.mmio.phys_addr = m.gpa
    run.mmio.len = m.size
    run.mmio.is_write = m.is_write
    if m.is_write:  # only len bytes are written; a read leaves data as it was
        ctypes.memmove(ctypes.addressof(run.mmio.data), m.data, m.size)
        if rep is not None:
            prefixes, _ = rep
            insn = arch.hw.mmio_insn_rip
            rep_string_exit(vcpu, insn, insn + len(prefixes) + 1, prefixes)
    else:
        arch.complete_userspace_io = complete_emulated_mmio
    return 0


def kernel_mmio(vcpu: KvmVcpu, gpa: int, size: int, is_write: bool, data: bytes) -> int | None:
    """vcpu_mmio_read/write: the local APIC's page and the IOAPIC's window are answered in
    the kernel, with no exit (None: no in-kernel device there). A load is finished at once
    with the device's bytes."""
    page = x86_lapic.apic_base_page(vcpu)
    chip = vcpu.kvm.arch.irqchip
    if page is not None and page <= gpa < page + x86_lapic.LAPIC_MMIO_LENGTH:
        if is_write:
            x86_lapic.apic_mmio_write(vcpu, gpa, data)
            return 1
        value = x86_lapic.apic_mmio_read(vcpu, gpa, size)
        if value is None:  # not a readable register: the bytes of the last emulated read
            value = bytes(vcpu.arch.mmio_read_buffer[:size])
    elif chip is not None and x86_ioapic.ioapic_in_range(chip.vioapic, gpa):
        if is_write:
            x86_ioapic.ioapic_mmio_write(chip.vioapic, gpa, data)
            return 1
        value = x86_ioapic.ioapic_mmio_read(chip.vioapic, gpa, size)
    else:
        return None
    return complete_emulated_mmio(vcpu, value)


@traced()
def complete_emulated_mmio(vcpu: KvmVcpu, data: bytes | None = None) -> int:
    """Finish the instruction that waits for userspace's bytes, before anything else runs
    (so immediate_exit still sees it done); it may exit again (a second read, a store)."""
    arch = vcpu.arch
    run: Any = vcpu.run
    hw = arch.hw
    if data is None:
        data = bytes(run.mmio.data[: hw.mmio.size])
    arch.mmio_read_buffer[: len(data)] = data
    hw.mmio_complete_read(data)
    kvm_register_flush(vcpu)
    guest_lock = vcpu.kvm.guest_lock
    guest_lock.acquire(vcpu)
    try:
        reason = hw.vcpu_run(arch.rip, retire_only=True)
    finally:
        guest_lock.release()
    arch.rip, arch.rip_dirty, arch.rflags = hw.rip, False, hw.rflags
    if reason == vendor.EXIT_REASON_MONITOR_TRAP_FLAG:
        return 1
    return handle_exit(vcpu, reason)


@traced(args=lambda vcpu: {"write": vcpu.arch.hw.cr_write})
def handle_cr(vcpu: KvmVcpu) -> int:
    """MOV to or from CR8, the task priority (VMX's CR8 load/store exiting): the in-kernel
    APIC's TPR, else KVM's own cr8. Without an in-kernel APIC, lowering it exits to userspace
    (KVM_EXIT_SET_TPR), which may have an interrupt to inject now."""
    arch = vcpu.arch
    cpu = arch.hw.cpu
    kvm_register_flush(vcpu)
    code = cpu.read_code(arch.rip, 15)
    prefixes = 0
    while prefixes < len(code) and code[prefixes] in (0x66, 0x67, 0xF2, 0xF3, 0xF0):
        prefixes += 1
    rex = code[prefixes] if prefixes < len(code) and 0x40 <= code[prefixes] <= 0x4F else 0
    modrm = code[prefixes + bool(rex) + 2]
    reg = GPR_BY_NUMBER[(modrm & 7) | (8 if rex & 1 else 0)]
    next_rip = arch.rip + prefixes + bool(rex) + 3
    if not arch.hw.cr_write:
        cpu.write_reg(reg, kvm_get_cr8(vcpu))
        return kvm_skip_emulated_instruction(vcpu, next_rip)
    value = cpu.read_reg(reg)
    if value & CR8_RESERVED_BITS:
        return kvm_inject_gp(vcpu)
    before = kvm_get_cr8(vcpu)
    kvm_set_cr8(vcpu, value)
    r = kvm_skip_emulated_instruction(vcpu, next_rip)
    if arch.apic is not None or value >= before or r == 0:
        return r
    vcpu.run.exit_reason = KVM_EXIT_SET_TPR
    return 0


@traced()
def kvm_emulate_rdmsr(vcpu: KvmVcpu) -> int:
    """RDMSR: EDX:EAX = the MSR named by ECX, or #GP(0) if KVM does not know it."""
    cpu = vcpu.arch.hw.cpu
    kvm_register_flush(vcpu)
    value = kvm_get_msr(vcpu, cpu.read_reg(UC_X86_REG_RCX) & 0xFFFF_FFFF, False)
    if value is None:
        return kvm_inject_gp(vcpu)
    cpu.write_reg(UC_X86_REG_RAX, value & 0xFFFF_FFFF)
    cpu.write_reg(UC_X86_REG_RDX, value >> 32)
    return kvm_skip_emulated_instruction(vcpu, vcpu.arch.rip + 2)


@traced()
def kvm_emulate_wrmsr(vcpu: KvmVcpu) -> int:
    """WRMSR: the MSR named by ECX = EDX:EAX, or #GP(0) if KVM refuses it."""
    cpu = vcpu.arch.hw.cpu
    kvm_register_flush(vcpu)
    index = cpu.read_reg(UC_X86_REG_RCX) & 0xFFFF_FFFF
    value = (cpu.read_reg(UC_X86_REG_RDX) & 0xFFFF_FFFF) << 32
    value |= cpu.read_reg(UC_X86_REG_RAX) & 0xFFFF_FFFF
    if not kvm_set_msr(vcpu, index, value, False):
        return kvm_inject_gp(vcpu)
    return kvm_skip_emulated_instruction(vcpu, vcpu.arch.rip + 2)


def kvm_inject_gp(vcpu: KvmVcpu) -> int:
    """Queue #GP(0) for the next entry; the guest re-enters at once."""
    vcpu.arch.exception = Event(GP_VECTOR, 0)
    return 1


@traced()
def kvm_emulate_halt(vcpu: KvmVcpu) -> int:
    """HLT (rip is already past it): without an in-kernel local APIC userspace decides
    (KVM_EXIT_HLT); with one the vCPU is HALTED and sleeps in KVM_RUN until an interrupt."""
    vcpu.stat.halt_exits += 1
    if x86_irq.lapic_in_kernel(vcpu):
        vcpu.arch.mp_state = KVM_MP_STATE_HALTED
        return 1
    vcpu.run.exit_reason = KVM_EXIT_HLT
    return 0


@traced()
def handle_emulation_failure(vcpu: KvmVcpu) -> int:
    """Code fetched from where no memory slot is: KVM's emulator gives up (suberror 1).

    prepare_emulation_failure_exit: data[0] = flags (no instruction bytes: nothing could be
    fetched), then VMX's exit information: an EPT violation (48) on an instruction fetch with
    a valid, translated linear address (qualification 0x184).
    """
    run: Any = vcpu.run
    vcpu.stat.insn_emulation_fail += 1
    run.exit_reason = KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = KVM_INTERNAL_ERROR_EMULATION
    data = (0, vendor.EXIT_REASON_EPT_VIOLATION, EPT_VIOLATION_FETCH_QUALIFICATION, 0, 0, 0)
    run.internal.ndata = len(data)
    for i, word in enumerate(data):
        run.internal.data[i] = word
    return 0


@traced()
def handle_exception_nmi(vcpu: KvmVcpu) -> int:
    """An intercepted guest exception: #BP under KVM_GUESTDBG_USE_SW_BP is KVM_EXIT_DEBUG."""
    hw = vcpu.arch.hw
    vector = hw.exception_vector
    return kvm_debug_exit(vcpu, vector, hw.debug_dr6 if vector == DB_VECTOR else 0)


def handle_unsupported_delivery(vcpu: KvmVcpu) -> int:
    """An event kvmlab's CPU cannot deliver (task gate, ring change): say so, do not guess.

    Reported as KVM_EXIT_INTERNAL_ERROR with suberror DELIVERY_EV; docs/kernel.md lists what
    the simulator delivers.
    """
    run: Any = vcpu.run
    run.exit_reason = KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = KVM_INTERNAL_ERROR_DELIVERY_EV
    run.internal.ndata = 0
    return 0


# --- kvm_run bookkeeping ----------------------------------------------------------------------


def sync_regs(vcpu: KvmVcpu) -> None:
    """Load the register sets userspace marked dirty in kvm_run.s.regs, then clear the marks."""
    run: Any = vcpu.run
    if run.kvm_dirty_regs & KVM_SYNC_X86_REGS:
        regs = kvm_regs.from_buffer_copy(run.s.regs.regs)
        kvm_arch_vcpu_ioctl_set_regs(vcpu, regs)
    if run.kvm_dirty_regs & KVM_SYNC_X86_SREGS:
        kvm_arch_vcpu_ioctl_set_sregs(vcpu, kvm_sregs.from_buffer_copy(run.s.regs.sregs))
    if run.kvm_dirty_regs & KVM_SYNC_X86_EVENTS:
        events = kvm_vcpu_events.from_buffer_copy(run.s.regs.events)
        kvm_vcpu_ioctl_x86_set_vcpu_events(vcpu, events)
    run.kvm_dirty_regs &= ~(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS)


def store_regs(vcpu: KvmVcpu) -> None:
    """Copy the register sets userspace asked for (kvm_valid_regs) into kvm_run.s.regs."""
    run: Any = vcpu.run
    if run.kvm_valid_regs & KVM_SYNC_X86_REGS:
        kvm_arch_vcpu_ioctl_get_regs(vcpu, run.s.regs.regs)
    if run.kvm_valid_regs & KVM_SYNC_X86_SREGS:
        kvm_arch_vcpu_ioctl_get_sregs(vcpu, run.s.regs.sregs)
    if run.kvm_valid_regs & KVM_SYNC_X86_EVENTS:
        events = kvm_vcpu_events()
        kvm_vcpu_ioctl_x86_get_vcpu_events(vcpu, events)
        run.s.regs.events = events


@traced()
def post_kvm_run_save(vcpu: KvmVcpu) -> None:
    """Tell userspace, in kvm_run, about IF, CR8, the APIC base and whether it may inject."""
    arch = vcpu.arch
    if_flag = bool(arch.rflags & X86_RFLAGS_IF)
    ready = kvm_vcpu_ready_for_interrupt_injection(vcpu) if if_flag else False
    ready = ready or x86_irq.pic_in_kernel(vcpu.kvm)
    _RUN_OUT.pack_into(vcpu.run_map, 12, ready, if_flag, 0, kvm_get_cr8(vcpu), arch.apic_base)


def kvm_vcpu_ready_for_interrupt_injection(vcpu: KvmVcpu) -> bool:
    """IF set, no interrupt shadow, and no KVM_INTERRUPT vector already waiting."""
    arch = vcpu.arch
    if not arch.rflags & X86_RFLAGS_IF or arch.interrupt is not None:
        return False
    return not arch.hw.cpu.interrupt_shadow()


class X86:
    """The x86 ops handed to kvm_init (what kvm_x86_ops and the arch hooks are in Linux)."""

    name = "x86_64"
    KVM_MAX_VCPUS = KVM_MAX_VCPUS
    KVM_MAX_VCPU_IDS = KVM_MAX_VCPU_IDS
    KVM_VCPU_MMAP_PAGES = 3  # kvm_run, the PIO data page, the coalesced MMIO ring
    kvm_run_type = kvm_run

    kvm_arch_dev_ioctl = staticmethod(kvm_arch_dev_ioctl)
    kvm_arch_init_vm = staticmethod(kvm_arch_init_vm)
    kvm_arch_destroy_vm = staticmethod(kvm_arch_destroy_vm)
    kvm_vm_ioctl_check_extension = staticmethod(kvm_vm_ioctl_check_extension)
    kvm_arch_vm_ioctl = staticmethod(kvm_arch_vm_ioctl)
    kvm_arch_vcpu_precreate = staticmethod(kvm_arch_vcpu_precreate)
    kvm_arch_vcpu_create = staticmethod(kvm_arch_vcpu_create)
    kvm_arch_vcpu_destroy = staticmethod(kvm_arch_vcpu_destroy)
    kvm_arch_vcpu_ioctl = staticmethod(kvm_arch_vcpu_ioctl)
    kvm_arch_vcpu_ioctl_run = staticmethod(kvm_arch_vcpu_ioctl_run)
    kvm_arch_vcpu_ioctl_get_mpstate = staticmethod(kvm_arch_vcpu_ioctl_get_mpstate)
    kvm_arch_irqfd_allowed = staticmethod(x86_irq.irqchip_in_kernel)
    kvm_set_irq = staticmethod(x86_irq.kvm_set_irq)
    kvm_register_irq_ack_notifier = staticmethod(x86_irq.kvm_register_irq_ack_notifier)
    kvm_unregister_irq_ack_notifier = staticmethod(x86_irq.kvm_unregister_irq_ack_notifier)


# --- module load and unload -------------------------------------------------------------------


@traced()
def vmx_init() -> None:
    """module_init of the vendor module (kvm-intel; here the Unicorn CPU): set the CPU up,
    then hand the ops to kvm_init, whose last step makes /dev/kvm appear."""
    kvm_x86_vendor_init()
    kvm_init(X86())


@traced()
def kvm_x86_vendor_init() -> None:
    vmx_hardware_setup()


@traced()
def vmx_hardware_setup() -> None:
    """Find where Unicorn keeps the hidden CPU state and its intercept controls, and what its
    CPU implements; an unknown Unicorn fails loudly here."""
    context_layout()
    svm_layout()
    cpuid_mod.supported_cpuid()


@traced()
def vmx_exit() -> None:
    """module_exit: /dev/kvm disappears; VMs still open keep working until closed."""
    kvm_exit()
