"""arch/x86/kvm/cpuid.c: the CPU model KVM offers, the guest's CPUID table, and `cpuid` itself.

KVM_GET_SUPPORTED_CPUID describes what the "hardware" can run: here that is what Unicorn's
x86 CPU answers to `cpuid` (QEMU already drops what TCG cannot emulate), plus KVM's own
leaves 0x40000000-0x40000001. A guest sees nothing of it until userspace sets a table with
KVM_SET_CPUID2; without one every leaf reads zero.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/cpuid.c
"""

from __future__ import annotations

import ctypes
import errno
import functools
import struct

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX

from kvmlab.kernel.trace import traced
from kvmlab.kernel.uaccess import copy_from_user, copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid2, kvm_cpuid_entry2

KVM_MAX_CPUID_ENTRIES = 256
ENTRY_SIZE = ctypes.sizeof(kvm_cpuid_entry2)
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
# Leaves whose output depends on ECX: their entries carry KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F})
X86_FEATURE_APIC = 1 << 9  # CPUID.1:EDX
X86_FEATURE_OSXSAVE = 1 << 27  # CPUID.1:ECX
X86_FEATURE_X2APIC = 1 << 21  # CPUID.1:ECX, emulated by the in-kernel APIC
X86_FEATURE_TSC_DEADLINE_TIMER = 1 << 24  # CPUID.1:ECX, emulated too
X86_FEATURE_HYPERVISOR = 1 << 31  # CPUID.1:ECX
X86_CR4_OSXSAVE = 1 << 18
VENDOR_AMD = struct.unpack("<3I", b"AuthenticAMD")  # ebx, edx, ecx order below
VENDOR_HYGON = struct.unpack("<3I", b"HygonGenuine")

Entry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx


def _probe_cpuid(uc: Uc, function: int, index: int) -> tuple[int, int, int, int]:
    uc.reg_write(UC_X86_REG_EAX, function)
    uc.reg_write(UC_X86_REG_ECX, index)
    uc.emu_start(0x1000, 0, count=1)
    regs = (UC_X86_REG_EAX, UC_X86_REG_EBX, UC_X86_REG_ECX, UC_X86_REG_EDX)
    return tuple(uc.reg_read(r) & 0xFFFF_FFFF for r in regs)


@functools.cache
def supported_cpuid() -> tuple[Entry, ...]:
    """kvm_set_cpu_caps for kvmlab: every leaf Unicorn's CPU answers, run once on a scratch
    engine, with KVM's adjustments (hypervisor bit on, OSXSAVE off; x2APIC and the
    TSC-deadline timer on, which the in-kernel APIC emulates) and KVM's own leaves."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x2000, UC_PROT_ALL)
    uc.mem_write(0x1000, b"\x0f\xa2")  # cpuid
    entries: list[Entry] = []
    for base in (0, 0x8000_0000):
        top = _probe_cpuid(uc, base, 0)[0]
        for function in range(base, top + 1):
            if function not in INDEXED_LEAVES:
                eax, ebx, ecx, edx = _probe_cpuid(uc, function, 0)
                if function == 1:
                    ecx = (ecx | X86_FEATURE_HYPERVISOR) & ~X86_FEATURE_OSXSAVE
                    ecx |= X86_FEATURE_X2APIC | X86_FEATURE_TSC_DEADLINE_TIMER
                    edx |= X86_FEATURE_APIC
                    ebx &= 0x00FF_FFFF  # the initial APIC ID is the vCPU's, filled per vCPU
                entries.append((function, 0, 0, eax, ebx, ecx, edx))
                continue
            for index in range(64):
                regs = _probe_cpuid(uc, function, index)
                if index and not any(regs):
                    break
                entries.append((function, index, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, *regs))
    signature = struct.unpack("<3I", b"KVMKVMKVM\0\0\0")
    entries.append((KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *signature))
    entries.append((KVM_CPUID_FEATURES, 0, 0, 0, 0, 0, 0))  # no paravirtual features
    uc.mem_unmap(0, 0x2000)
    return tuple(entries)


def _pack(entries: list[Entry] | tuple[Entry, ...]) -> bytes:
    return b"".join(struct.pack("<7I12x", *e) for e in entries)


def _unpack(raw: bytes | bytearray, n: int) -> list[Entry]:
    return [struct.unpack_from("<7I", raw, i * ENTRY_SIZE) for i in range(n)]


@traced(args=lambda addr: {})
def kvm_dev_ioctl_get_cpuid(addr: int) -> int:
    """KVM_GET_SUPPORTED_CPUID: at most `nent` (capped at 256) entries; E2BIG leaves nent."""
    header = copy_struct_from_user(kvm_cpuid2, addr)
    if header.nent < 1:
        fail(errno.E2BIG)
    entries = supported_cpuid()
    if len(entries) > min(header.nent, KVM_MAX_CPUID_ENTRIES):
        fail(errno.E2BIG)
    copy_to_user(addr + kvm_cpuid2.entries.offset, _pack(entries))
    header.nent = len(entries)
    copy_to_user(addr, header)
    return 0


class GuestCpuid:
    """vcpu->arch.cpuid_entries: the table the guest's `cpuid` answers from."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._index: dict[tuple[int, int | None], tuple[int, int, int, int]] = {}

    def replace(self, entries: list[Entry]) -> None:
        self.entries = entries
        index: dict[tuple[int, int | None], tuple[int, int, int, int]] = {}
        for fn, idx, flags, eax, ebx, ecx, edx in entries:
            key = (fn, idx if flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX else None)
            index.setdefault(key, (eax, ebx, ecx, edx))
            index.setdefault((fn, -1), (eax, ebx, ecx, edx))  # kvm_find_cpuid_entry: any index
        self._index = index

    def find(self, function: int, index: int) -> tuple[int, int, int, int] | None:
        """kvm_find_cpuid_entry_index."""
        found = self._index.get((function, None))
        return found if found is not None else self._index.get((function, index))

    def find_any(self, function: int) -> tuple[int, int, int, int] | None:
        """kvm_find_cpuid_entry: the first entry of `function`, whatever its index."""
        return self._index.get((function, -1))


@traced(args=lambda cpuid, addr, has_run: {"has_run": has_run})
def kvm_vcpu_ioctl_set_cpuid2(cpuid: GuestCpuid, addr: int, has_run: bool) -> list[Entry]:
    """KVM_SET_CPUID2: up to 256 entries; once the vCPU has run, only the table it already
    has (as KVM_GET_CPUID2 returns it) is accepted. Returns the new entries."""
    header = copy_struct_from_user(kvm_cpuid2, addr)
    if header.nent > KVM_MAX_CPUID_ENTRIES:
        fail(errno.E2BIG)
    raw = copy_from_user(addr + kvm_cpuid2.entries.offset, header.nent * ENTRY_SIZE)
    entries = _unpack(raw, header.nent)
    if has_run and entries != cpuid.entries:  # kvm_cpuid_check_equal
        fail(errno.EINVAL)
    return entries


@traced(args=lambda cpuid, addr: {})
def kvm_vcpu_ioctl_get_cpuid2(cpuid: GuestCpuid, addr: int) -> None:
    """KVM_GET_CPUID2: E2BIG (nent unchanged) if the caller has room for fewer entries."""
    header = copy_struct_from_user(kvm_cpuid2, addr)
    if header.nent < len(cpuid.entries):
        fail(errno.E2BIG)
    copy_to_user(addr + kvm_cpuid2.entries.offset, _pack(cpuid.entries))
    header.nent = len(cpuid.entries)
    copy_to_user(addr, header)


def kvm_update_cpuid_runtime(cpuid: GuestCpuid, apic_enabled: bool, cr4: int) -> None:
    """The bits of leaf 1 that follow the vCPU's state: APIC (the APIC base's enable bit) and
    OSXSAVE (CR4.OSXSAVE, where the table offers XSAVE)."""
    changed = False
    entries = list(cpuid.entries)
    for i, (fn, idx, flags, eax, ebx, ecx, edx) in enumerate(entries):
        if fn != 1:
            continue
        new_edx = (edx | X86_FEATURE_APIC) if apic_enabled else (edx & ~X86_FEATURE_APIC)
        new_ecx = ecx
        if ecx & (1 << 26):  # XSAVE
            osxsave = X86_FEATURE_OSXSAVE if cr4 & X86_CR4_OSXSAVE else 0
            new_ecx = (ecx & ~X86_FEATURE_OSXSAVE) | osxsave
        if (new_ecx, new_edx) != (ecx, edx):
            entries[i] = (fn, idx, flags, eax, ebx, new_ecx, new_edx)
            changed = True
    if changed:
        cpuid.replace(entries)


def _out_of_range(cpuid: GuestCpuid, function: int, index: int) -> tuple[int, int, int, int] | None:
    """get_out_of_range_cpuid_entry: Intel CPUs answer a leaf beyond its class's maximum with
    the highest basic leaf (AMD and Hygon with zeros)."""
    basic = cpuid.find_any(0)
    if basic is None or (basic[1], basic[3], basic[2]) in (VENDOR_AMD, VENDOR_HYGON):
        return None
    if 0x4000_0000 <= function <= 0x4FFF_FFFF:
        klass = cpuid.find_any(function & 0xFFFF_FF00)
    elif function >= 0xC000_0000:
        klass = cpuid.find_any(0xC000_0000)
    else:
        klass = cpuid.find_any(function & 0x8000_0000)
    if klass is not None and function <= klass[0]:
        return None
    return cpuid.find(basic[0], index)


@traced(args=lambda cpuid, function, index: {"eax": function, "ecx": index})
def kvm_cpuid(cpuid: GuestCpuid, function: int, index: int) -> tuple[int, int, int, int]:
    """What the guest's `cpuid` returns for EAX=function, ECX=index (kvm_emulate_cpuid)."""
    found = cpuid.find(function, index)
    if found is None:
        found = _out_of_range(cpuid, function, index)
    if found is not None:
        return found
    if function in (0xB, 0x1F):  # CL passes through and EDX is the x2APIC ID, if implemented
        level1 = cpuid.find(function, 1)
        if level1 is not None:
            return 0, 0, index & 0xFF, level1[3]
    return 0, 0, 0, 0
