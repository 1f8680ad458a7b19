"""Scenarios for the CPU model: KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2 / KVM_GET_CPUID2 and the
guest's `cpuid`, which answers from the vCPU's table (all zeros without one) and cannot change
once the vCPU has run.

The tables set here avoid leaf 1 and leaf 0xd, whose contents KVM adjusts at run time (the APIC
and OSXSAVE bits); PVM adds more there.
"""

from __future__ import annotations

import struct
from typing import Any

from kvmlab.uapi import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_GET_CPUID2,
    KVM_GET_SUPPORTED_CPUID,
    KVM_SET_CPUID2,
    flex,
    kvm_cpuid2,
)

from .guest import Fds, machine, try_ioctl
from .registry import scenario
from .scenarios_irq import name

CPUID_HLT = b"\x0f\xa2\xf4"  # cpuid; hlt
KVM_SIGNATURE = struct.unpack("<3I", b"KVMKVMKVM\0\0\0")


def table(entries: list[tuple[int, int, int, int, int, int, int]]) -> Any:
    """A kvm_cpuid2 with these (function, index, flags, eax, ebx, ecx, edx) entries."""
    cpuid = flex(kvm_cpuid2, len(entries))(nent=len(entries))
    for e, values in zip(cpuid.entries, entries, strict=True):
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = values
    return cpuid


def rows(cpuid: Any) -> list[tuple[int, ...]]:
    return [
        (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in cpuid.entries[: cpuid.nent]
    ]


def guest_cpuid(m: Any, eax: int, ecx: int = 0) -> tuple[Any, ...]:
    """Run `cpuid; hlt` with EAX/ECX set: the exit, then EAX..EDX and rip."""
    m.update_regs(rax=eax, rbx=0x5A5A, rcx=ecx, rdx=0xA5A5, rip=0x1000)
    exit_ = name(m.run())
    r = m.regs()
    return exit_, r.rax, r.rbx, r.rcx, r.rdx, r.rip


@scenario
def supported_cpuid(k: Any) -> dict[str, Any]:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm: E2BIG with nent left as given when it is too small;
    otherwise nent is the count, with KVM's signature leaf and a vendor in leaf 0."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        small = flex(kvm_cpuid2, 1)(nent=1)
        out: dict[str, Any] = {"small": try_ioctl(k, sys_fd, KVM_GET_SUPPORTED_CPUID, small)}
        out["small_nent"] = small.nent
        big = flex(kvm_cpuid2, 300)(nent=300)  # more than 256: capped, not refused
        out["big"] = try_ioctl(k, sys_fd, KVM_GET_SUPPORTED_CPUID, big)
        found = {(e[0], e[1]): e for e in rows(big)}
        out["count_ok"] = 1 < big.nent <= 256
        out["kvm_signature"] = found[(0x4000_0000, 0)][4:]
        out["leaf0_max_ok"] = found[(0, 0)][3] >= 1
        out["vcpu_fd"] = try_ioctl(k, fds.create_vm(sys_fd), KVM_GET_SUPPORTED_CPUID, big)
    assert out["small"] == "E2BIG" and out["small_nent"] == 1 and out["big"] == 0
    assert out["kvm_signature"] == KVM_SIGNATURE and out["count_ok"] and out["leaf0_max_ok"]
    return out


@scenario
def cpuid_without_table(k: Any) -> dict[str, Any]:
    """With no KVM_SET_CPUID2, every leaf reads zero; KVM_GET_CPUID2 has no entries."""
    with machine(k, CPUID_HLT) as m:
        empty = flex(kvm_cpuid2, 4)(nent=4)
        out: dict[str, Any] = {"get": try_ioctl(k, m.vcpu_fd, KVM_GET_CPUID2, empty)}
        out["nent"] = empty.nent
        out["leaf0"] = guest_cpuid(m, 0)
        out["leaf_ext"] = guest_cpuid(m, 0x8000_0000)
        out["set_empty_after_run"] = try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, flex(kvm_cpuid2, 0)())
    assert out["nent"] == 0 and out["leaf0"] == ("HLT", 0, 0, 0, 0, 0x1003)
    return out


TABLE = [
    (0, 0, 0, 4, 0x6C6D766B, 0x20206261, 0x20202020),  # max leaf 4, "kvmlab  " vendor
    (4, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0x121, 0x1C0003F, 0x3F, 0),
    (4, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0x122, 0x1C0003F, 0x3F, 0),
    (0x8000_0000, 0, 0, 0x8000_0001, 0, 0, 0),
    (0x8000_0001, 0, 0, 0, 0, 0x21, 0x2000_0000),
]


@scenario
def cpuid_from_table(k: Any) -> dict[str, Any]:
    """The guest's `cpuid` answers from the table: an indexed leaf by ECX, and a leaf past its
    class's maximum (vendor not AMD) as the highest basic leaf. GET_CPUID2 gives it back
    (E2BIG, nent unchanged, when there is no room); more than 256 entries is E2BIG."""
    with machine(k, CPUID_HLT) as m:
        out: dict[str, Any] = {"set": try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, table(TABLE))}
        small = flex(kvm_cpuid2, 2)(nent=2)
        out["get_small"] = (try_ioctl(k, m.vcpu_fd, KVM_GET_CPUID2, small), small.nent)
        got = flex(kvm_cpuid2, 8)(nent=8)
        out["get"] = try_ioctl(k, m.vcpu_fd, KVM_GET_CPUID2, got)
        out["table"] = rows(got)
        too_many = flex(kvm_cpuid2, 257)(nent=257)
        out["too_many"] = try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, too_many)
        out["leaf0"] = guest_cpuid(m, 0)
        out["leaf4_1"] = guest_cpuid(m, 4, 1)
        out["leaf4_7"] = guest_cpuid(m, 4, 7)  # no such index: zeros
        out["ext1"] = guest_cpuid(m, 0x8000_0001)
        out["past_basic"] = guest_cpuid(m, 9, 1)  # -> leaf 4 index 1
        out["past_ext"] = guest_cpuid(m, 0x8000_0008)
    assert out["set"] == 0 and out["get"] == 0 and out["table"] == TABLE
    assert out["get_small"] == ("E2BIG", 2) and out["too_many"] == "E2BIG"
    assert out["leaf4_1"][1:5] == (0x122, 0x1C0003F, 0x3F, 0)
    assert out["leaf4_7"][1:5] == (0, 0, 0, 0)
    assert out["past_basic"][1:5] == (0x122, 0x1C0003F, 0x3F, 0)
    return out


@scenario
def cpuid_frozen_after_run(k: Any) -> dict[str, Any]:
    """After the first KVM_RUN only the table KVM_GET_CPUID2 returns is accepted (EINVAL for
    any other); before it, a table can be replaced freely."""
    with machine(k, CPUID_HLT) as m:
        first = table(TABLE[:1])
        out: dict[str, Any] = {"before": try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, first)}
        out["replace"] = try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, table(TABLE))
        out["run"] = guest_cpuid(m, 0)
        got = flex(kvm_cpuid2, 8)(nent=8)
        k.ioctl(m.vcpu_fd, KVM_GET_CPUID2, got)
        out["same"] = try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, got)
        out["other"] = try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, first)
        out["empty"] = try_ioctl(k, m.vcpu_fd, KVM_SET_CPUID2, flex(kvm_cpuid2, 0)())
    assert out["before"] == out["replace"] == out["same"] == 0
    assert out["other"] == out["empty"] == "EINVAL"
    return out
