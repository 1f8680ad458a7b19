"""Scenarios for vCPU state: reset values, KVM_SET_REGS/SREGS validity, fd lifetimes."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from kvmlab.uapi import (
    KVM_GET_MP_STATE,
    KVM_RUN,
    X86_CR0_CD,
    X86_CR0_ET,
    X86_CR0_NW,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    X86_EFER_LME,
    kvm_mp_state,
    kvm_regs,
    kvm_sregs,
)

from .guest import (
    CODE_ADDR,
    KVM_RUN_SIZE,
    MEM_SIZE,
    PML4_ADDR,
    Fds,
    get_regs,
    get_sregs,
    machine,
    regs_dict,
    set_region,
    set_regs,
    sregs_dict,
    try_set_sregs,
)
from .registry import scenario

HLT = b"\xf4"  # hlt


def get_mp_state(k: Any, vcpu_fd: int) -> int:
    buf = bytearray(ctypes.sizeof(kvm_mp_state))
    k.ioctl(vcpu_fd, KVM_GET_MP_STATE, buf)
    return kvm_mp_state.from_buffer_copy(buf).mp_state


def new_vcpu(fds: Fds, vcpu_id: int = 0) -> tuple[int, int]:
    """A VM fd and a fresh vCPU fd (no memory, never run)."""
    vm_fd = fds.create_vm(fds.open_kvm())
    return vm_fd, fds.create_vcpu(vm_fd, vcpu_id)


@scenario
def reset_regs(k: Any) -> dict[str, int]:
    """A new vCPU: all GPRs 0 except rdx = 0x600, rip = 0xfff0, rflags = 0x2."""
    with Fds(k) as fds:
        _, vcpu_fd = new_vcpu(fds)
        regs = regs_dict(get_regs(k, vcpu_fd))
    expected = dict.fromkeys(regs, 0) | {"rdx": 0x600, "rip": 0xFFF0, "rflags": 0x2}
    assert regs == expected
    return regs


@scenario
def reset_sregs(k: Any) -> dict[str, Any]:
    """A new vCPU's segments, tables and control registers (kvm_vcpu_reset)."""
    with Fds(k) as fds:
        _, vcpu_fd = new_vcpu(fds)
        sregs = sregs_dict(get_sregs(k, vcpu_fd))
    cs = sregs["cs"]
    assert (cs["selector"], cs["base"], cs["limit"], cs["type"]) == (0xF000, 0xFFFF0000, 0xFFFF, 11)
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = sregs[name]
        assert (seg["selector"], seg["base"], seg["limit"], seg["type"]) == (0, 0, 0xFFFF, 3)
        assert (seg["s"], seg["present"], seg["unusable"]) == (1, 1, 0)
    assert (sregs["tr"]["type"], sregs["tr"]["s"]) == (11, 0)
    assert (sregs["ldt"]["type"], sregs["ldt"]["s"]) == (2, 0)
    assert sregs["gdt"] == sregs["idt"] == (0, 0xFFFF)
    assert sregs["cr0"] == 0x60000010
    assert (sregs["cr2"], sregs["cr3"], sregs["cr4"], sregs["cr8"], sregs["efer"]) == (0,) * 5
    assert sregs["apic_base"] == 0xFEE00900
    assert sregs["interrupt_bitmap"] == (0, 0, 0, 0)
    return sregs


@scenario
def reset_apic_base_and_mp_state(k: Any) -> dict[str, int]:
    """vCPU 0 is the BSP (apic_base 0xfee00900), others are not (0xfee00800); all RUNNABLE."""
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        out: dict[str, int] = {}
        for vcpu_id in (0, 1, 7):
            vcpu_fd = fds.create_vcpu(vm_fd, vcpu_id)
            out[f"apic_base_{vcpu_id}"] = get_sregs(k, vcpu_fd).apic_base
            out[f"mp_state_{vcpu_id}"] = get_mp_state(k, vcpu_fd)
    assert out == {
        "apic_base_0": 0xFEE00900,
        "mp_state_0": 0,
        "apic_base_1": 0xFEE00800,
        "mp_state_1": 0,
        "apic_base_7": 0xFEE00800,
        "mp_state_7": 0,
    }
    return out


@scenario
def kvm_run_zero_before_first_run(k: Any) -> dict[str, Any]:
    """The mmap'ed kvm_run page of a new vCPU is all zero (apic_base included) until KVM_RUN."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        vcpu_fd = fds.create_vcpu(vm_fd, 0)
        runmap = fds.map_run(sys_fd, vcpu_fd)
        size = len(runmap)
        page0 = bytes(runmap[:KVM_RUN_SIZE])
    assert size == 12288
    assert page0 == bytes(KVM_RUN_SIZE)
    return {"mmap_len": size, "kvm_run_nonzero_bytes": sum(1 for b in page0 if b)}


@scenario
def set_regs_roundtrip_and_rflags_bit1(k: Any) -> dict[str, Any]:
    """KVM_SET_REGS stores every GPR as given but forces RFLAGS bit 1 (the fixed bit) on."""
    with Fds(k) as fds:
        _, vcpu_fd = new_vcpu(fds)
        regs = kvm_regs()
        for i, name in enumerate(regs_dict(regs)):
            setattr(regs, name, 0x1111111111111111 * (i % 15 + 1))
        regs.rflags = 0
        set_regs(k, vcpu_fd, regs)
        after_zero = regs_dict(get_regs(k, vcpu_fd))
        regs.rflags = 0x202  # IF
        set_regs(k, vcpu_fd, regs)
        after_if = get_regs(k, vcpu_fd).rflags
        regs.rflags = 0x8D5  # OF|SF|ZF|AF|PF|CF without bit 1
        set_regs(k, vcpu_fd, regs)
        after_arith = get_regs(k, vcpu_fd).rflags
    assert after_zero["rflags"] == 0x2
    assert after_zero["rax"] == 0x1111111111111111
    assert after_zero["rip"] == 0x1111111111111111 * 2
    assert after_if == 0x202
    assert after_arith == 0x8D7
    return {"after_zero": after_zero, "after_if": after_if, "after_arith": after_arith}


def sregs_case(base: kvm_sregs, **changes: int) -> kvm_sregs:
    """A copy of `base` with top-level fields changed; "cs_l"/"cs_db" set cs.l / cs.db."""
    sregs = kvm_sregs.from_buffer_copy(bytes(base))
    for name, value in changes.items():
        if name.startswith("cs_"):
            setattr(sregs.cs, name[3:], value)
        else:
            setattr(sregs, name, value)
    return sregs


def try_sregs_cases(
    k: Any, cases: dict[str, dict[str, int]], no_readback: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Try each case on a fresh vCPU; record the result and that a refused set changed nothing.

    An accepted case also records cr0/cr4/efer/cs.l as read back, unless listed in `no_readback`.
    """
    out: dict[str, Any] = {}
    with Fds(k) as fds:
        _, vcpu_fd = new_vcpu(fds)
        base = get_sregs(k, vcpu_fd)
        for name, changes in cases.items():
            r = try_set_sregs(k, vcpu_fd, sregs_case(base, **changes))
            after = get_sregs(k, vcpu_fd)
            if r == 0 and name in no_readback:
                out[name] = ("ok", None)
            elif r == 0:
                got = {key: getattr(after, key) for key in ("cr0", "cr4", "efer")}
                got["cs_l"] = after.cs.l
                out[name] = ("ok", got)
            else:
                assert bytes(after) == bytes(base), f"{name}: a refused SET_SREGS changed state"
                out[name] = r
            assert try_set_sregs(k, vcpu_fd, base) == 0
    return out


PE, PG, ET, CD, NW = X86_CR0_PE, X86_CR0_PG, X86_CR0_ET, X86_CR0_CD, X86_CR0_NW
LME, LMA, PAE = X86_EFER_LME, X86_EFER_LMA, X86_CR4_PAE
LONG = {"cr0": PE | PG | ET, "cr4": PAE, "efer": LME | LMA, "cr3": PML4_ADDR}


@scenario
def set_sregs_cr0_rules(k: Any) -> dict[str, Any]:
    """CR0: PG needs PE, NW needs CD, bits 63:32 are reserved."""
    out = try_sregs_cases(
        k,
        {
            "pg_without_pe": {"cr0": PG | ET},
            "pe_and_pg_32bit": {"cr0": PE | PG | ET},
            "nw_without_cd": {"cr0": NW | ET},
            "cd_without_nw": {"cr0": CD | ET},
            "bit32": {"cr0": (1 << 32) | ET},
            "bit63": {"cr0": (1 << 63) | PE | ET},
            "zero": {"cr0": 0},
        },
        # PVM only keeps CR0.PG in long mode: it reads back 0x11 here, where VMX/SVM keep PG.
        no_readback=frozenset({"pe_and_pg_32bit"}),
    )
    for name in ("pg_without_pe", "nw_without_cd", "bit32", "bit63"):
        assert out[name] == "EINVAL", (name, out[name])
    for name in ("pe_and_pg_32bit", "cd_without_nw", "zero"):
        assert out[name][0] == "ok", (name, out[name])
    return out


@scenario
def set_sregs_long_mode_rules(k: Any) -> dict[str, Any]:
    """EFER.LME with CR0.PG needs LMA and CR4.PAE; LMA alone (without LME and PG) is invalid."""
    out = try_sregs_cases(
        k,
        {
            "long_mode": LONG,
            "lme_without_paging": {"efer": LME, "cr0": PE | ET},
            "lme_lma_without_paging": {"efer": LME | LMA, "cr0": PE | ET},
            "lma_without_lme": {"efer": LMA, "cr0": PE | PG | ET, "cr4": PAE},
            "lme_pg_without_lma": {"efer": LME, "cr0": PE | PG | ET, "cr4": PAE},
            "lme_lma_pg_without_pae": {"efer": LME | LMA, "cr0": PE | PG | ET, "cr4": 0},
            "lma_real_mode": {"efer": LMA},
        },
    )
    assert out["long_mode"][0] == "ok"
    assert out["lme_without_paging"][0] == "ok"
    for name in list(out)[2:]:
        assert out[name] == "EINVAL", (name, out[name])
    return out


@scenario
def set_sregs_cs_l_rules(k: Any) -> dict[str, Any]:
    """cs.l (a 64-bit code segment) is only valid with EFER.LMA."""
    out = try_sregs_cases(
        k,
        {
            "cs_l_real_mode": {"cs_l": 1},
            "cs_l_protected": {"cr0": PE | ET, "cs_l": 1},
            "cs_l_long_mode": {**LONG, "cs_l": 1},
            "cs_l_db_long_mode": {**LONG, "cs_l": 1, "cs_db": 1},
        },
    )
    assert out["cs_l_real_mode"] == out["cs_l_protected"] == "EINVAL"
    assert out["cs_l_long_mode"][0] == "ok"
    return out


@scenario
def set_sregs_cr4_reserved(k: Any) -> dict[str, Any]:
    """Reserved CR4 bits are EINVAL; defined ones the host CPU has (DE, PAE) are accepted."""
    out = try_sregs_cases(
        k,
        {
            "bit15": {"cr4": 1 << 15},
            "bit31": {"cr4": 1 << 31},
            "bit32": {"cr4": 1 << 32},
            "bit63": {"cr4": 1 << 63},
            "de": {"cr4": 1 << 3},
            "pae": {"cr4": PAE},
        },
    )
    for name in ("bit15", "bit31", "bit32", "bit63"):
        assert out[name] == "EINVAL", (name, out[name])
    assert out["de"][0] == out["pae"][0] == "ok"
    return out


@scenario
def set_sregs_apic_base(k: Any) -> dict[str, Any]:
    """sregs.apic_base goes through kvm_set_apic_base: reserved bits and x2APIC are EINVAL."""
    out = try_sregs_cases(
        k,
        {
            "reserved_bit0": {"apic_base": 0xFEE00901},
            "x2apic_without_cpuid": {"apic_base": 0xFEE00D00},
            "disabled": {"apic_base": 0},
            "same": {"apic_base": 0xFEE00900},
        },
    )
    assert out["reserved_bit0"] == out["x2apic_without_cpuid"] == "EINVAL"
    assert out["disabled"][0] == out["same"][0] == "ok"
    return out


def run_to_hlt_after(k: Any, closing: Callable[[Fds, dict[str, int]], None]) -> dict[str, Any]:
    """Build a VM running `hlt` by hand, call `closing(fds, fd_by_name)`, then KVM_RUN."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        mem, hva = fds.ram()
        assert set_region(k, vm_fd, 0, 0, MEM_SIZE, hva) == 0
        mem[CODE_ADDR] = HLT[0]
        vcpu_fd = fds.create_vcpu(vm_fd, 0)
        runmap = fds.map_run(sys_fd, vcpu_fd)
        sregs = get_sregs(k, vcpu_fd)
        sregs.cs.base = sregs.cs.selector = 0
        assert try_set_sregs(k, vcpu_fd, sregs) == 0
        regs = kvm_regs(rip=CODE_ADDR, rflags=2)
        set_regs(k, vcpu_fd, regs)
        closing(fds, {"sys": sys_fd, "vm": vm_fd})
        r = k.ioctl(vcpu_fd, KVM_RUN, 0)
        exit_reason = int.from_bytes(runmap[8:12], "little")
        rip = get_regs(k, vcpu_fd).rip
    return {"run": r, "exit_reason": exit_reason, "rip": rip}


@scenario
def vm_survives_vm_fd_close(k: Any) -> dict[str, Any]:
    """Closing the VM fd while a vCPU fd is open keeps the VM alive: KVM_RUN still works."""
    out = run_to_hlt_after(k, lambda fds, fd: fds.close(fd["vm"]))
    assert out == {"run": 0, "exit_reason": 5, "rip": CODE_ADDR + 1}
    return out


@scenario
def vm_survives_system_fd_close(k: Any) -> dict[str, Any]:
    """The system fd holds no VM state: closing it (and the VM fd) does not affect the vCPU."""

    def close_both(fds: Fds, fd: dict[str, int]) -> None:
        fds.close(fd["sys"])
        fds.close(fd["vm"])

    out = run_to_hlt_after(k, close_both)
    assert out == {"run": 0, "exit_reason": 5, "rip": CODE_ADDR + 1}
    return out


@scenario
def mp_state_after_hlt(k: Any) -> dict[str, Any]:
    """Without an in-kernel irqchip HLT exits to userspace and the vCPU stays RUNNABLE."""
    with machine(k, HLT + HLT) as m:
        first = m.run()
        state = get_mp_state(k, m.vcpu_fd)
        rip1 = m.regs().rip
        second = m.run()
        rip2 = m.regs().rip
    out = {"exits": (first, second), "mp_state": state, "rips": (rip1, rip2)}
    assert out == {"exits": (5, 5), "mp_state": 0, "rips": (CODE_ADDR + 1, CODE_ADDR + 2)}
    return out
