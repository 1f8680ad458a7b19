"""Scenarios for MSRs: KVM_GET_MSR_INDEX_LIST, KVM_GET_MSRS / KVM_SET_MSRS (the count of MSRs
processed, stopping at the first one KVM refuses), the guest's `rdmsr`/`wrmsr` on the same
values, #GP for an MSR KVM does not know, and the TSC: its rate and a monotonic `rdtsc`.
"""

from __future__ import annotations

import struct
from typing import Any

from kvmlab.uapi import (
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_MSRS,
    KVM_GET_TSC_KHZ,
    KVM_SET_MSRS,
    KVM_SET_TSC_KHZ,
    flex,
    kvm_msr_list,
    kvm_msrs,
)

from .guest import DATA_ADDR, machine, try_ioctl
from .registry import scenario
from .scenarios_faults import GP, HANDLER_ADDR, load_tables
from .scenarios_irq import name

MSR_SYSENTER_CS, MSR_STAR, MSR_LSTAR, MSR_EFER, MSR_PAT = (
    0x174,
    0xC0000081,
    0xC0000082,
    0xC0000080,
    0x277,
)
UNKNOWN = 0x1234
CORE = {0x174, 0x175, 0x176, MSR_STAR, MSR_LSTAR, 0xC0000083, 0xC0000084, 0xC0000102, 0x10, MSR_PAT}


def msrs(entries: list[tuple[int, int]]) -> Any:
    buf = flex(kvm_msrs, len(entries))(nmsrs=len(entries))
    for e, (index, data) in zip(buf.entries, entries, strict=True):
        e.index, e.data = index, data
    return buf


def get_msrs(m: Any, indices: list[int]) -> tuple[int | str, list[int]]:
    buf = msrs([(i, 0) for i in indices])
    r = try_ioctl(m.k, m.vcpu_fd, KVM_GET_MSRS, buf)
    return r, [e.data for e in buf.entries]


@scenario
def msr_index_list(k: Any) -> dict[str, Any]:
    """KVM_GET_MSR_INDEX_LIST: too little room is E2BIG with the count written back; the list
    holds the MSRs a VMM saves (SYSENTER, SYSCALL, TSC, PAT, ...)."""
    with machine(k, b"\xf4") as m:
        small = flex(kvm_msr_list, 1)(nmsrs=1)
        out: dict[str, Any] = {"small": try_ioctl(k, m.sys_fd, KVM_GET_MSR_INDEX_LIST, small)}
        full = flex(kvm_msr_list, 512)(nmsrs=512)
        out["full"] = try_ioctl(k, m.sys_fd, KVM_GET_MSR_INDEX_LIST, full)
        out["count_written_back"] = small.nmsrs == full.nmsrs
        out["has_core"] = set(full.indices[: full.nmsrs]) >= CORE
        out["vm_fd"] = try_ioctl(k, m.vm_fd, KVM_GET_MSR_INDEX_LIST, full)
    assert out["small"] == "E2BIG" and out["full"] == 0 and out["count_written_back"]
    assert out["has_core"]
    return out


@scenario
def msr_get_set(k: Any) -> dict[str, Any]:
    """Reset values, a batch stopping at an unknown MSR (the return value is the count done),
    values written and read back, a reserved EFER bit refused, and 256 entries is E2BIG."""
    with machine(k, b"\xf4") as m:
        out: dict[str, Any] = {
            "reset": get_msrs(m, [MSR_SYSENTER_CS, MSR_STAR, MSR_LSTAR, MSR_EFER, MSR_PAT, 0x1B]),
            "stops": get_msrs(m, [MSR_SYSENTER_CS, UNKNOWN, MSR_STAR])[0],
        }
        values = [(MSR_STAR, 0x0023_0010_0000_0000), (MSR_LSTAR, 0xFFFF_8000_1234_5000)]
        out["set"] = try_ioctl(k, m.vcpu_fd, KVM_SET_MSRS, msrs(values))
        out["read_back"] = get_msrs(m, [MSR_STAR, MSR_LSTAR])
        out["set_unknown"] = try_ioctl(
            k, m.vcpu_fd, KVM_SET_MSRS, msrs([(MSR_STAR, 1), (UNKNOWN, 1)])
        )
        out["efer_reserved"] = try_ioctl(k, m.vcpu_fd, KVM_SET_MSRS, msrs([(MSR_EFER, 1 << 20)]))
        out["lstar_noncanonical"] = try_ioctl(
            k, m.vcpu_fd, KVM_SET_MSRS, msrs([(MSR_LSTAR, 1 << 63)])
        )
        big = flex(kvm_msrs, 1)(nmsrs=256)
        out["too_many"] = try_ioctl(k, m.vcpu_fd, KVM_GET_MSRS, big)
        out["none"] = try_ioctl(k, m.vcpu_fd, KVM_GET_MSRS, flex(kvm_msrs, 0)())
    assert out["stops"] == 1 and out["set"] == 2 and out["set_unknown"] == 1
    assert out["read_back"] == (2, [v for _, v in values])
    assert out["efer_reserved"] == 0 and out["too_many"] == "E2BIG" and out["none"] == 0
    return out


# 64-bit guest: wrmsr STAR from rdx:rax, rdmsr it back into [DATA], then rdmsr an unknown MSR.
GUEST = (
    b"\xb9"
    + struct.pack("<I", MSR_STAR)  # mov ecx, STAR
    + b"\x0f\x30"  # wrmsr
    + b"\x31\xc0\x31\xd2"  # xor eax, eax; xor edx, edx
    + b"\x0f\x32"  # rdmsr
    + b"\x89\x04\x25"
    + struct.pack("<I", DATA_ADDR)  # mov [DATA], eax
    + b"\x89\x14\x25"
    + struct.pack("<I", DATA_ADDR + 4)  # mov [DATA+4], edx
    + b"\xb9"
    + struct.pack("<I", UNKNOWN)  # mov ecx, UNKNOWN
    + b"\x0f\x32"  # rdmsr -> #GP
    + b"\xf4"
)


@scenario
def msr_guest_rdmsr_wrmsr(k: Any) -> dict[str, Any]:
    """The guest's wrmsr is what KVM_GET_MSRS reads and its rdmsr sees the value back; an MSR
    KVM does not know raises #GP(0) at the rdmsr (the handler gets its rip and error code)."""
    handler = b"\xb0\x0d\xe6\x10\xf4"  # mov al, 13; out 0x10, al; hlt
    with machine(k, GUEST, "long64") as m:
        m.write(HANDLER_ADDR, handler)
        load_tables(m, "long64", {GP: HANDLER_ADDR})
        m.update_regs(rax=0x0010_0008, rdx=0x0023_0018)
        first = m.run()
        out: dict[str, Any] = {"exit": name(first), "vector": m.io()["data"]}
        rsp = m.regs().rsp
        code, rip = struct.unpack_from("<QQ", m.mem, rsp)
        out["gp_frame"] = (code, rip - 0x1000)
        out["guest_read"] = struct.unpack_from("<Q", m.mem, DATA_ADDR)[0]
        out["kvm_read"] = get_msrs(m, [MSR_STAR])
    assert out["exit"] == "IO" and out["vector"] == bytes([GP])
    assert out["guest_read"] == 0x0023_0018_0010_0008 and out["kvm_read"][1] == [out["guest_read"]]
    assert out["gp_frame"] == (0, len(GUEST) - 3)
    return out


RDTSC_TWICE = (
    b"\x0f\x31\x89\x04\x25"
    + struct.pack("<I", DATA_ADDR)  # rdtsc; mov [DATA], eax
    + b"\x89\x14\x25"
    + struct.pack("<I", DATA_ADDR + 4)  # mov [DATA+4], edx
    + b"\x0f\x31\x89\x04\x25"
    + struct.pack("<I", DATA_ADDR + 8)
    + b"\x89\x14\x25"
    + struct.pack("<I", DATA_ADDR + 12)
    + b"\xf4"
)


@scenario
def tsc_rate_and_rdtsc(k: Any) -> dict[str, Any]:
    """KVM_GET_TSC_KHZ (VM and vCPU, not /dev/kvm); KVM_SET_TSC_KHZ without TSC scaling: the
    host rate or faster is taken, slower is EINVAL, 0 means the host's; a VM's default rate
    cannot change once it has vCPUs; 2**31 kHz reads back negative (KVM's `int` result). The
    guest's rdtsc never goes backwards."""
    with machine(k, RDTSC_TWICE, "long64") as m:
        khz = k.ioctl(m.vcpu_fd, KVM_GET_TSC_KHZ, 0)
        out: dict[str, Any] = {
            "vm_equals_vcpu": k.ioctl(m.vm_fd, KVM_GET_TSC_KHZ, 0) == khz,
            "sys": try_ioctl(k, m.sys_fd, KVM_GET_TSC_KHZ, 0),
            "vm_set": try_ioctl(k, m.vm_fd, KVM_SET_TSC_KHZ, khz),
            "faster": try_ioctl(k, m.vcpu_fd, KVM_SET_TSC_KHZ, khz * 2),
            "after_faster": k.ioctl(m.vcpu_fd, KVM_GET_TSC_KHZ, 0) == khz * 2,
            "slower": try_ioctl(k, m.vcpu_fd, KVM_SET_TSC_KHZ, khz // 2),
            "zero": try_ioctl(k, m.vcpu_fd, KVM_SET_TSC_KHZ, 0),
            "after_zero": k.ioctl(m.vcpu_fd, KVM_GET_TSC_KHZ, 0) == khz,
            # a rate of 2**31 kHz is taken, and reads back through KVM's `int r`: negative
            "huge": try_ioctl(k, m.vcpu_fd, KVM_SET_TSC_KHZ, 0x8000_0000),
            "huge_reads": try_ioctl(k, m.vcpu_fd, KVM_GET_TSC_KHZ, 0),
            # ... and one within 4095 of 2**32 reads back as an errno, by the syscall convention
            "huger": try_ioctl(k, m.vcpu_fd, KVM_SET_TSC_KHZ, 0xFFFF_FF84),
            "huger_reads": try_ioctl(k, m.vcpu_fd, KVM_GET_TSC_KHZ, 0),
            "exit": name(m.run()),
        }
        a, b = struct.unpack_from("<QQ", m.mem, DATA_ADDR)
        out["monotonic"] = 0 < a <= b
    assert out["vm_equals_vcpu"] and out["sys"] == "EINVAL" and out["vm_set"] == "EINVAL"
    assert out["faster"] == 0 and out["slower"] == "EINVAL" and out["after_zero"]
    assert out["monotonic"] and out["huge_reads"] == -(2**31)
    return out
