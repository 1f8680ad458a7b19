"""The PC's CPU model: the CPUID table built from it, filtered by KVM_GET_SUPPORTED_CPUID and set
on every vCPU with KVM_SET_CPUID2, on both backends."""

from __future__ import annotations

import dataclasses
import struct
from types import ModuleType

import pytest

from kvmlab.uapi import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_GET_CPUID2, flex, kvm_cpuid2
from kvmlab.vmm import EXCP_HLT
from kvmlab.vmm.cpu_model import (
    FEAT_1_ECX,
    FEAT_1_EDX,
    FEAT_8000_0001_ECX,
    FEAT_8000_0001_EDX,
    KVMLAB64,
    X86CPUDefinition,
    bits,
    cpu_x86_cpuid,
    x86_cpu_filter_features,
)
from kvmlab.vmm.i386 import kvm_arch_get_registers
from kvmlab.vmm.pc import PC

MB = 1 << 20
CODE = 0x1000
CPUID_LEAF1 = b"\x66\xb8\x01\x00\x00\x00\x0f\xa2\xf4"  # (real mode) mov eax, 1; cpuid; hlt


def table(model: X86CPUDefinition = KVMLAB64, apic_id: int = 0) -> dict[int, tuple[int, ...]]:
    return {e[0]: e[3:] for e in cpu_x86_cpuid(model, model.features, apic_id)}


def test_family_model_and_stepping_are_encoded_as_cpuid_leaf_1_says() -> None:
    assert KVMLAB64.cpuid_version == 0x00060FB1  # family 15, model 107 = 0x6b, stepping 1
    zen4 = dataclasses.replace(KVMLAB64, family=0x19, model=0x11, stepping=1)
    assert zen4.cpuid_version == 0x00A10F11  # family 0xf + 0xa, as AMD's family 19h reads


def test_the_table_has_every_leaf_up_to_the_models_maximums_and_kvms_signature() -> None:
    leaves = table()
    assert sorted(leaves) == [*range(7), 0x4000_0000, 0x4000_0001, *range(0x8000_0000, 0x8000_0009)]
    vendor = struct.pack("<3I", leaves[0][1], leaves[0][3], leaves[0][2])
    assert (leaves[0][0], vendor) == (6, b"AuthenticAMD")
    assert leaves[0x8000_0000] == (0x8000_0008, *leaves[0][1:])
    brand = b"".join(struct.pack("<4I", *leaves[f]) for f in range(0x8000_0002, 0x8000_0005))
    assert brand.rstrip(b"\0") == b"kvmlab Virtual CPU"
    assert leaves[0x8000_0001][3] & bits(FEAT_8000_0001_EDX, "lm")  # long mode
    assert leaves[0x8000_0008][0] == 0x3028  # 48 virtual, 40 physical address bits
    assert leaves[0x4000_0000][1:] == struct.unpack("<3I", b"KVMKVMKVM\0\0\0")
    assert leaves[0x4000_0001] == (0, 0, 0, 0)  # no paravirtual features
    assert leaves[2] == leaves[6] == (0, 0, 0, 0)
    entries = cpu_x86_cpuid(KVMLAB64, KVMLAB64.features, 0)
    assert [e[2] for e in entries if e[0] == 4] == [KVM_CPUID_FLAG_SIGNIFCANT_INDEX]


def test_leaf_1_ebx_carries_the_initial_apic_id() -> None:
    assert table(apic_id=0)[1][1] == 0x0000_0800  # CLFLUSH line: 8 quadwords
    assert table(apic_id=254)[1][1] == 0xFE00_0800
    with pytest.raises(ValueError, match="xAPIC ID"):
        table(apic_id=256)


def test_features_the_host_lacks_are_dropped_and_named_as_qemu_names_them() -> None:
    model = dataclasses.replace(
        KVMLAB64, features={**KVMLAB64.features, FEAT_1_ECX: bits(FEAT_1_ECX, "sse3", "cx16")}
    )
    supported = {(1, "ecx"): bits(FEAT_1_ECX, "cx16"), (1, "edx"): 0xFFFF_FFFF}
    kept, missing = x86_cpu_filter_features(model, supported)
    assert kept[FEAT_1_ECX] == bits(FEAT_1_ECX, "cx16")
    assert kept[FEAT_1_EDX] == KVMLAB64.features[FEAT_1_EDX]
    assert "CPUID.01H:ECX.sse3 [bit 0]" in missing
    assert "CPUID.80000001H:EDX.lm [bit 29]" in missing  # not in `supported` at all


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vendor": "AMD"}, "12 characters"),
        ({"xlevel": 0x8000_0000}, "long mode"),
        ({"model_id": "x" * 49}, "longer than 48"),
    ],
)
def test_impossible_models_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(KVMLAB64, **change)  # type: ignore[arg-type]


# --- on the PC, on both backends ---------------------------------------------------------------


def guest_leaf1(pc: PC, index: int) -> tuple[int, int, int, int]:
    """What vCPU `index` reads with `cpuid` for leaf 1: EAX..EDX."""
    pc.setup_cpu(index, "real", CODE)
    assert pc.run(max_exits=10, cpu=index) == EXCP_HLT
    cpu = pc.cpus[index]
    kvm_arch_get_registers(cpu)
    r = cpu.regs
    return r.rax & 0xFFFF_FFFF, r.rbx & 0xFFFF_FFFF, r.rcx & 0xFFFF_FFFF, r.rdx & 0xFFFF_FFFF


def test_both_backends_run_every_feature_of_the_model(k: ModuleType) -> None:
    with PC(k, ram_size=2 * MB) as pc:
        assert pc.filtered_features == []
    svm = dataclasses.replace(
        KVMLAB64,
        features={**KVMLAB64.features, FEAT_8000_0001_ECX: bits(FEAT_8000_0001_ECX, "svm")},
    )
    with PC(k, ram_size=2 * MB, cpu_model=svm) as pc:  # no nested virtualization on either
        assert pc.filtered_features == ["CPUID.80000001H:ECX.svm [bit 2]"]


def test_each_vcpu_reads_its_own_apic_id_in_leaf_1(k: ModuleType) -> None:
    with PC(k, ram_size=2 * MB, cpus=3) as pc:
        pc.load(CPUID_LEAF1, CODE)
        for index in (0, 2):
            eax, ebx, ecx, edx = guest_leaf1(pc, index)
            assert (eax, ebx) == (0x00060FB1, index << 24 | 0x800)
            assert ecx & KVMLAB64.features[FEAT_1_ECX] == KVMLAB64.features[FEAT_1_ECX]
            assert edx & KVMLAB64.features[FEAT_1_EDX] == KVMLAB64.features[FEAT_1_EDX]


def test_without_a_model_kvm_has_no_table_and_every_leaf_reads_zero(k: ModuleType) -> None:
    with PC(k, ram_size=2 * MB, cpu_model=None) as pc:
        got = flex(kvm_cpuid2, 8)(nent=8)
        k.ioctl(pc.cpus[0].kvm_fd, KVM_GET_CPUID2, got)
        assert got.nent == 0
        pc.load(CPUID_LEAF1, CODE)
        assert guest_leaf1(pc, 0) == (0, 0, 0, 0)
