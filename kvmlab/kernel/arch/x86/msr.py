"""The MSRs KVM knows, for KVM_GET/SET_MSRS and for the guest's `rdmsr`/`wrmsr`.

Both paths go through kvm_get_msr_common / kvm_set_msr_common (arch/x86/kvm/x86.c), so
userspace and the guest see the same values; an MSR not listed here fails, which the guest
sees as #GP(0) and KVM_GET/SET_MSRS as the end of the batch. Values live where the CPU keeps
them (Unicorn's MSRs) or in KVM's own vCPU state.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/x86.c
"""

from __future__ import annotations

import errno
import struct
import threading
from dataclasses import dataclass
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_EDX

from kvmlab.kernel.arch.x86.lapic import (
    APIC_BASE_MSR,
    MSR_IA32_TSC_DEADLINE,
    kvm_get_lapic_tscdeadline_msr,
    kvm_set_lapic_tscdeadline_msr,
    kvm_x2apic_msr_read,
    kvm_x2apic_msr_write,
)
from kvmlab.kernel.trace import traced
from kvmlab.kernel.uaccess import copy_from_user, copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import kvm_msr_list, kvm_msrs

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_TSC_ADJUST = 0x3B
MSR_PLATFORM_INFO = 0xCE
MSR_MTRRCAP = 0xFE
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103

MAX_IO_MSRS = 256
MSR_ENTRY = struct.Struct("<IIQ")  # struct kvm_msr_entry
MISC_ENABLE_FAST_STRING = 1
PLATFORM_INFO_CPUID_FAULT = 1 << 31
KVM_MAX_MCE_BANKS = 32
PAT_DEFAULT = 0x0007_0406_0007_0406
MTRRCAP_VALUE = 0x500 | 8  # WC and fixed-range MTRRs, 8 variable ranges
EFER_VALID = 0x1 | 0x100 | 0x400 | 0x800  # SCE, LME, LMA, NXE
CPU_MSRS = frozenset(
    {
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_LSTAR,
        MSR_CSTAR,
        MSR_SYSCALL_MASK,
        MSR_FS_BASE,
        MSR_GS_BASE,
        MSR_KERNEL_GS_BASE,
        MSR_IA32_CR_PAT,
        MSR_TSC_AUX,
    }
)
CANONICAL_MSRS = frozenset({MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR})
# KVM_GET_MSR_INDEX_LIST: msrs_to_save then emulated_msrs (those userspace must migrate).
MSRS_TO_SAVE = (
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_STAR,
    MSR_CSTAR,
    MSR_KERNEL_GS_BASE,
    MSR_SYSCALL_MASK,
    MSR_LSTAR,
    MSR_IA32_TSC,
    MSR_IA32_CR_PAT,
    MSR_IA32_TSC_ADJUST,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_MCG_STATUS,
    MSR_PLATFORM_INFO,
)


class _HostTsc:
    """Reads the TSC the way the guest's `rdtsc` does on Unicorn (QEMU's cpu_get_host_ticks,
    the host's own TSC), on a scratch engine whose TSC offset is 0."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uc: Uc | None = None

    def __call__(self) -> int:
        with self._lock:
            uc = self._uc
            if uc is None:
                uc = self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
                uc.mem_map(0, 0x1000, UC_PROT_ALL)
                uc.mem_write(0, b"\x0f\x31")  # rdtsc
            uc.emu_start(0, 2)
            return (uc.reg_read(UC_X86_REG_EDX) << 32) | uc.reg_read(UC_X86_REG_EAX)


host_tsc = _HostTsc()


@dataclass
class MsrState:
    """The MSR values KVM keeps itself (vcpu->arch.*), beside the CPU's own."""

    misc_enable: int = MISC_ENABLE_FAST_STRING
    mcg_cap: int = KVM_MAX_MCE_BANKS
    mcg_status: int = 0
    platform_info: int = PLATFORM_INFO_CPUID_FAULT
    mtrr_def_type: int = 0
    tsc_adjust: int = 0
    last_tsc_write: tuple[int, int] = (0, 0)  # (value, host TSC then): kvm_synchronize_tsc


def is_noncanonical(value: int) -> bool:
    """Bits 63:47 not all equal (48-bit virtual addresses)."""
    top = value >> 47
    return top not in (0, (1 << 17) - 1)


def pat_valid(value: int) -> bool:
    """kvm_pat_valid: each byte a memory type (UC, WC, WT, WP, WB, UC-)."""
    return all((value >> (8 * i)) & 0xFF in (0, 1, 4, 5, 6, 7) for i in range(8))


@traced("kvm_get_msr_common", args=lambda vcpu, index, host: {"msr": index, "host": host})
def kvm_get_msr(vcpu: Any, index: int, host: bool) -> int | None:
    """The value of MSR `index`, or None when KVM does not know it (the guest gets #GP)."""
    arch = vcpu.arch
    cpu = arch.hw.cpu
    state: MsrState = arch.msrs
    if index in CPU_MSRS:
        if index == MSR_TSC_AUX and not host and not arch.guest_has_rdtscp():
            return None
        return cpu.read_msr(index)
    if index == MSR_EFER:
        return cpu.read_msr(MSR_EFER)
    if index == MSR_IA32_TSC:
        return (host_tsc() + cpu.tsc_offset()) & 0xFFFF_FFFF_FFFF_FFFF
    if index == MSR_IA32_APICBASE:
        return int(arch.apic_base)
    if APIC_BASE_MSR <= index < APIC_BASE_MSR + 0x100:
        return kvm_x2apic_msr_read(vcpu, index)
    if index == MSR_IA32_TSC_DEADLINE:
        return None if arch.apic is None else kvm_get_lapic_tscdeadline_msr(vcpu)
    simple = {
        MSR_IA32_TSC_ADJUST: state.tsc_adjust,
        MSR_IA32_MISC_ENABLE: state.misc_enable,
        MSR_IA32_MCG_CAP: state.mcg_cap,
        MSR_IA32_MCG_STATUS: state.mcg_status,
        MSR_PLATFORM_INFO: state.platform_info,
        MSR_MTRRCAP: MTRRCAP_VALUE,
        MSR_MTRR_DEF_TYPE: state.mtrr_def_type,
    }
    return simple.get(index)


@traced("kvm_set_msr_common", args=lambda vcpu, index, value, host: {"msr": index, "host": host})
def kvm_set_msr(vcpu: Any, index: int, value: int, host: bool) -> bool:
    """Write MSR `index`; False when KVM refuses (unknown MSR, reserved bits, bad value)."""
    arch = vcpu.arch
    cpu = arch.hw.cpu
    state: MsrState = arch.msrs
    if index in CANONICAL_MSRS and is_noncanonical(value):
        return False
    if index == MSR_IA32_CR_PAT and not pat_valid(value):
        return False
    if index in (MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP):
        value = value if not is_noncanonical(value) else value & ((1 << 48) - 1)
    if index in CPU_MSRS:
        if index == MSR_TSC_AUX and (value >> 32 or (not host and not arch.guest_has_rdtscp())):
            return False
        cpu.write_msr(index, value)
        return True
    if index == MSR_EFER:
        return bool(arch.set_efer(value, host))
    if index == MSR_IA32_TSC:
        set_guest_tsc(vcpu, value, host)
        return True
    if index == MSR_IA32_TSC_ADJUST:
        cpu.set_tsc_offset(cpu.tsc_offset() + value - state.tsc_adjust)
        state.tsc_adjust = value
        return True
    if index == MSR_IA32_APICBASE:
        return bool(arch.set_apic_base(vcpu, value, host))
    if APIC_BASE_MSR <= index < APIC_BASE_MSR + 0x100:
        return kvm_x2apic_msr_write(vcpu, index, value)
    if index == MSR_IA32_TSC_DEADLINE:
        if arch.apic is None:
            return False
        guest_tsc = (host_tsc() + cpu.tsc_offset()) & 0xFFFF_FFFF_FFFF_FFFF
        kvm_set_lapic_tscdeadline_msr(vcpu, value, guest_tsc)
        return True
    if index == MSR_IA32_MISC_ENABLE:
        state.misc_enable = value
        return True
    if index == MSR_IA32_MCG_STATUS:
        state.mcg_status = value
        return True
    if index == MSR_IA32_MCG_CAP:
        if not host or value & ~0xFF or value > KVM_MAX_MCE_BANKS:
            return False
        state.mcg_cap = value
        return True
    if index == MSR_PLATFORM_INFO:
        if not host or value & ~PLATFORM_INFO_CPUID_FAULT:
            return False
        state.platform_info = value
        return True
    if index == MSR_MTRR_DEF_TYPE:
        if value & ~0xCFF or (value & 0xFF) not in (0, 1, 4, 5, 6):
            return False
        state.mtrr_def_type = value
        return True
    return False


def set_guest_tsc(vcpu: Any, value: int, host: bool) -> None:
    """MSR_IA32_TSC. From the guest: move the offset and TSC_ADJUST by the jump. From userspace:
    kvm_synchronize_tsc, which takes a value within a second of what the last write predicts
    as an attempt to keep vCPUs in sync, and then leaves the offset alone."""
    arch = vcpu.arch
    cpu = arch.hw.cpu
    state: MsrState = arch.msrs
    now = host_tsc()
    current = now + cpu.tsc_offset()
    if not host:
        state.tsc_adjust += value - current
        cpu.set_tsc_offset(value - now)
        return
    khz = arch.tsc_khz
    last_value, last_host = state.last_tsc_write
    expected = last_value + (now - last_host)
    state.last_tsc_write = (value, now)
    if abs(value - expected) < khz * 1000:
        return
    cpu.set_tsc_offset(value - now)


def kvm_get_msr_index_list(addr: int, indices: tuple[int, ...]) -> int:
    """KVM_GET_MSR_INDEX_LIST: the count is written back first; E2BIG if it did not fit."""
    header = copy_struct_from_user(kvm_msr_list, addr)
    room = header.nmsrs
    header.nmsrs = len(indices)
    copy_to_user(addr, header)
    if room < len(indices):
        fail(errno.E2BIG)
    copy_to_user(addr + kvm_msr_list.indices.offset, struct.pack(f"<{len(indices)}I", *indices))
    return 0


def msr_io(vcpu: Any, addr: int, write: bool) -> int:
    """KVM_GET_MSRS / KVM_SET_MSRS: process entries in order, stop at the first one KVM
    refuses, and return how many were done (the entries are copied back for a read)."""
    header = copy_struct_from_user(kvm_msrs, addr)
    if header.nmsrs >= MAX_IO_MSRS:
        fail(errno.E2BIG)
    base = addr + kvm_msrs.entries.offset
    raw = copy_from_user(base, header.nmsrs * MSR_ENTRY.size)
    done = 0
    for i in range(header.nmsrs):
        index, reserved, data = MSR_ENTRY.unpack_from(raw, i * MSR_ENTRY.size)
        if write:
            if not kvm_set_msr(vcpu, index, data, True):
                break
        else:
            value = kvm_get_msr(vcpu, index, True)
            if value is None:
                break
            MSR_ENTRY.pack_into(raw, i * MSR_ENTRY.size, index, reserved, value)
        done += 1
    if not write:
        copy_to_user(base, raw)
    return done
