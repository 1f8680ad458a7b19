"""target/i386/cpu.c for kvmlab: a CPU model, and the CPUID table a vCPU gets from it.

QEMU gives every vCPU a model (`-cpu qemu64` by default): a vendor, a family/model/stepping, the
highest basic and extended leaves, and the feature bits it asks for. `x86_cpu_filter_features`
drops the bits KVM_GET_SUPPORTED_CPUID says the host cannot run, and `kvm_arch_init_vcpu` hands
the table to KVM with KVM_SET_CPUID2 (i386.py).

kvmlab's model, `KVMLAB64`, is QEMU's qemu64 (AMD vendor, family 15 model 107 stepping 1) cut
to what both backends offer, so that a guest reads the same CPUID on the simulator (Unicorn's
CPU) and on the host: no SSE3 (the host's KVM does not offer it), no SVM or x2APIC (neither
offers them), no paravirtual features in KVM's leaf 0x40000001 (the simulator has none), none
of the copies of leaf 1's EDX bits that QEMU puts in leaf 0x80000001 for an AMD vendor
(Unicorn's CPU, an Intel one, has none there), and basic leaves only up to 6, since the host's
KVM (PVM) replaces leaf 7 with the host CPU's own. PVM also adds the host CPU's extensions (AVX,
SSE4.2, ...) to leaf 1's ECX and EDX, whatever the table says: those bits are the one thing a
guest reads differently there (docs/kernel.md). Leaves the model says nothing in read zero:
QEMU describes its caches and topology there; kvmlab has neither to describe.
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/target/i386/cpu.c
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from kvmlab.uapi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_GET_SUPPORTED_CPUID, flex, kvm_cpuid2

log = logging.getLogger("kvmlab.vmm")
KVM_MAX_CPUID_ENTRIES = 256  # what KVM_GET_SUPPORTED_CPUID may return at most
KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES = 0x4000_0000, 0x4000_0001
REGS = ("eax", "ebx", "ecx", "edx")
# Leaves whose output depends on ECX (their entries carry KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
INDEXED_LEAVES = frozenset({4, 7, 0xB, 0xD})

Entry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx


@dataclass(frozen=True)
class FeatureWord:
    """One register of one leaf holding feature bits (QEMU's FeatureWordInfo), with the names
    of the bits a model may ask for."""

    leaf: int
    reg: str
    names: dict[int, str] = field(hash=False, compare=False)

    def describe(self, bit: int) -> str:
        """QEMU's words for a bit: "CPUID.01H:ECX.sse3 [bit 0]"."""
        leaf = f"{self.leaf:02X}H" if self.leaf < 0x100 else f"{self.leaf:08X}H"
        return f"CPUID.{leaf}:{self.reg.upper()}.{self.names.get(bit, '?')} [bit {bit}]"


FEAT_1_EDX = FeatureWord(1, "edx", {
    0: "fpu", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce", 8: "cx8",
    9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat",
    17: "pse36", 19: "clflush", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2",
})  # fmt: skip
FEAT_1_ECX = FeatureWord(1, "ecx", {0: "sse3", 13: "cx16", 21: "x2apic", 31: "hypervisor"})
FEAT_8000_0001_EDX = FeatureWord(0x8000_0001, "edx", {11: "syscall", 20: "nx", 29: "lm"})
FEAT_8000_0001_ECX = FeatureWord(0x8000_0001, "ecx", {0: "lahf_lm", 2: "svm"})
FEAT_KVM = FeatureWord(KVM_CPUID_FEATURES, "eax", {0: "kvmclock"})
PPRO_FEATURES = ("fpu", "de", "pse", "tsc", "msr", "mce", "cx8", "pge", "cmov", "pat", "fxsr",
                 "mmx", "sse", "sse2", "pae", "sep", "apic")  # fmt: skip


def bits(word: FeatureWord, *names: str) -> int:
    """The mask of the named bits of `word`."""
    by_name = {name: bit for bit, name in word.names.items()}
    return sum(1 << by_name[name] for name in names)


def _string_regs(text: str, size: int) -> tuple[int, ...]:
    """`text` (ASCII, at most `size` bytes, NUL-padded) as the little-endian dwords of CPUID."""
    raw = text.encode("ascii")
    if len(raw) > size:
        raise ValueError(f"{text!r} is longer than {size} characters")
    return struct.unpack(f"<{size // 4}I", raw.ljust(size, b"\0"))


@dataclass(frozen=True)
class X86CPUDefinition:
    """A CPU model, as QEMU's builtin_x86_defs list them."""

    name: str
    level: int  # the highest basic leaf (CPUID.0:EAX)
    xlevel: int  # the highest extended leaf (CPUID.80000000H:EAX)
    vendor: str  # 12 characters
    family: int
    model: int
    stepping: int
    features: dict[FeatureWord, int]
    model_id: str  # the brand string, at most 48 characters
    phys_bits: int = 40  # QEMU's default for every model
    virt_bits: int = 48

    def __post_init__(self) -> None:
        if self.level < 1 or not 0x8000_0001 <= self.xlevel <= 0x8000_00FF:
            raise ValueError("a 64-bit model has leaf 1 and leaf 0x80000001 (long mode) at least")
        if len(self.vendor.encode("ascii")) != 12:
            raise ValueError(f"a vendor is 12 characters, not {self.vendor!r}")
        _string_regs(self.model_id, 48)

    @property
    def cpuid_version(self) -> int:
        """CPUID.1:EAX: family, model, stepping, with the extended fields past 15."""
        family = 0xF00 | (self.family - 0xF) << 20 if self.family > 0xF else self.family << 8
        return family | (self.model & 0xF) << 4 | (self.model >> 4) << 16 | self.stepping


KVMLAB64 = X86CPUDefinition(
    name="kvmlab64",
    level=6,  # qemu64 has 0xd; the host (PVM) replaces leaf 7 with its CPU's own
    xlevel=0x8000_0008,
    vendor="AuthenticAMD",
    family=15,
    model=107,
    stepping=1,
    features={
        FEAT_1_EDX: bits(FEAT_1_EDX, *PPRO_FEATURES, "mtrr", "clflush", "mca", "pse36"),
        FEAT_1_ECX: bits(FEAT_1_ECX, "cx16", "hypervisor"),
        FEAT_8000_0001_EDX: bits(FEAT_8000_0001_EDX, "syscall", "nx", "lm"),
        FEAT_8000_0001_ECX: bits(FEAT_8000_0001_ECX, "lahf_lm"),
        FEAT_KVM: 0,
    },
    model_id="kvmlab Virtual CPU",
)


def kvm_arch_get_supported_cpuid(k: Any, kvm_fd: int) -> dict[tuple[int, str], int]:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm: each (leaf, register) at index 0."""
    cpuid = flex(kvm_cpuid2, KVM_MAX_CPUID_ENTRIES)(nent=KVM_MAX_CPUID_ENTRIES)
    k.ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid)
    supported: dict[tuple[int, str], int] = {}
    for e in cpuid.entries[: cpuid.nent]:
        if e.index == 0:
            for reg in REGS:
                supported[(e.function, reg)] = getattr(e, reg)
    return supported


def x86_cpu_filter_features(
    model: X86CPUDefinition, supported: dict[tuple[int, str], int]
) -> tuple[dict[FeatureWord, int], list[str]]:
    """The model's features the host can run, and the names of those it cannot (which QEMU
    reports as "host doesn't support requested feature")."""
    kept: dict[FeatureWord, int] = {}
    missing: list[str] = []
    for word, wanted in model.features.items():
        kept[word] = wanted & supported.get((word.leaf, word.reg), 0)
        dropped = wanted & ~kept[word]
        missing += [word.describe(bit) for bit in range(32) if dropped >> bit & 1]
    return kept, missing


def cpu_x86_cpuid(
    model: X86CPUDefinition, features: dict[FeatureWord, int], apic_id: int
) -> list[Entry]:
    """The CPUID table of one vCPU (QEMU's cpu_x86_cpuid for every leaf, as kvm_arch_init_vcpu
    collects it): every leaf up to `level` and `xlevel`, and KVM's signature leaves."""
    if not 0 <= apic_id <= 0xFF:
        raise ValueError(f"an xAPIC ID is 0 to 255, not {apic_id}")
    regs: dict[int, list[int]] = {}
    for function in (*range(model.level + 1), *range(0x8000_0000, model.xlevel + 1)):
        regs[function] = [0, 0, 0, 0]
    for word, value in features.items():
        regs.setdefault(word.leaf, [0, 0, 0, 0])[REGS.index(word.reg)] |= value
    vendor = _string_regs(model.vendor, 12)  # EBX, EDX, ECX
    regs[0][:] = model.level, vendor[0], vendor[2], vendor[1]
    regs[0x8000_0000][:] = model.xlevel, vendor[0], vendor[2], vendor[1]
    regs[1][0] = regs[0x8000_0001][0] = model.cpuid_version
    regs[1][1] = apic_id << 24 | 8 << 8  # initial APIC ID; CLFLUSH line of 8 quadwords
    brand = _string_regs(model.model_id, 48)
    for i, function in enumerate(range(0x8000_0002, 0x8000_0005)):
        if function <= model.xlevel:
            regs[function][:] = brand[4 * i : 4 * i + 4]
    if model.xlevel >= 0x8000_0008:
        regs[0x8000_0008][0] = model.virt_bits << 8 | model.phys_bits
    kvm_signature = struct.unpack("<3I", b"KVMKVMKVM\0\0\0")
    regs[KVM_CPUID_SIGNATURE] = [KVM_CPUID_FEATURES, *kvm_signature]
    entries: list[Entry] = []
    for function in sorted(regs):
        flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if function in INDEXED_LEAVES else 0
        eax, ebx, ecx, edx = regs[function]
        entries.append((function, 0, flags, eax, ebx, ecx, edx))
    return entries


def cpuid2(entries: list[Entry]) -> Any:
    """`entries` as the struct kvm_cpuid2 that KVM_SET_CPUID2 takes."""
    cpuid = flex(kvm_cpuid2, len(entries))(nent=len(entries))
    for e, values in zip(cpuid.entries, entries, strict=True):
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = values
    return cpuid
