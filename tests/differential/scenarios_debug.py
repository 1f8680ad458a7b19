"""Scenarios for KVM_SET_GUEST_DEBUG and KVM_EXIT_DEBUG (kvm-api-notes §4.1, §4.2, §8.6).

Single-step (ENABLE|SINGLESTEP) exits after every instruction with debug.arch.exception 1 (#DB),
pc = the *linear* address of the next instruction and dr6 = 0xffff4ff0 (BS). A hardware
breakpoint (USE_HW_BP, DR0/DR7) exits before the instruction with dr6 B0 set. x86 accepts unknown
control bits; SINGLESTEP without ENABLE does nothing; INJECT_BP/INJECT_DB queue #BP/#DB for the
guest (EBUSY while one is already queued).

PVM≠VMX, documented per scenario:
- debug.arch.dr7 is always 0 on the host; VMX reports the guest's DR7 as the CPU saved it.
- an OUT is not followed by its single-step exit, and a stepped HLT gives KVM_EXIT_DEBUG instead
  of KVM_EXIT_HLT (upstream squashes the debug exit there);
- `int3` under USE_SW_BP is not reported: real mode runs the guest's IVT[3] handler, protected
  and long mode fail in the emulator (KVM_EXIT_INTERNAL_ERROR).
"""

from __future__ import annotations

from typing import Any

from kvmlab.uapi import (
    KVM_EXIT_DEBUG,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_INJECT_BP,
    KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
    KVM_SET_GUEST_DEBUG,
    kvm_guest_debug,
)

from .guest import CODE_ADDR, MAX_RUNS, STACK_TOP, Machine, machine, try_ioctl
from .registry import host_is_pvm, scenario
from .scenarios_faults import HANDLER_ADDR, load_tables, reason_name, stack, summary

STEP = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
DR6_BS = 0xFFFF4FF0  # DR6 with BS (single step) and the always-1 bits
DR6_B0 = 0xFFFF0FF1  # DR6 with B0 (DR0 matched) and the always-1 bits
DR7_L0 = 0x1  # DR7 enabling DR0 as a local execution breakpoint


def set_guest_debug(m: Machine, control: int, debugreg: dict[int, int] | None = None) -> int | str:
    """KVM_SET_GUEST_DEBUG: 0 or the errno name. `debugreg` maps 0-3, 6, 7 to values."""
    dbg = kvm_guest_debug(control=control)
    for index, value in (debugreg or {}).items():
        dbg.arch.debugreg[index] = value
    return try_ioctl(m.k, m.vcpu_fd, KVM_SET_GUEST_DEBUG, bytes(dbg))


def debug_exit(m: Machine) -> dict[str, int]:
    """exception, pc, dr6 and dr7 of a DEBUG exit, and rip."""
    arch = m.kvm_run().debug.arch
    return {
        "exception": arch.exception,
        "pc": arch.pc,
        "dr6": arch.dr6,
        "dr7": arch.dr7,
        "rip": m.regs().rip,
    }


def step_exit(m: Machine) -> tuple[Any, ...]:
    """An exit while stepping: DEBUG as (name, exception, pc); IO as (name, port); else (name,
    rip). rip at an OUT exit differs on PVM, so it is not recorded."""
    reason = m.exit_reason
    if reason == KVM_EXIT_DEBUG:
        d = debug_exit(m)
        return ("DEBUG", d["exception"], d["pc"])
    if reason == KVM_EXIT_IO:
        return ("IO", m.io()["port"])
    return (reason_name(reason), m.regs().rip)


REAL_STEP_CODE = (
    b"\x90"  # 0: nop
    b"\x40"  # 1: inc ax
    b"\xbb\x34\x12"  # 2: mov bx, 0x1234
    b"\x01\xd8"  # 5: add ax, bx
    b"\xf4"  # 7: hlt
)
STEP_CODE = (
    b"\x90"  # 1000: nop
    b"\xff\xc0"  # 1001: inc eax
    b"\xbb\x34\x12\x00\x00"  # 1003: mov ebx, 0x1234
    b"\x01\xd8"  # 1008: add eax, ebx
    b"\xf4"  # 100a: hlt
)
# VMX's #DB exit reports the guest DR7 as the CPU saved it (reset value 0x400); PVM reports 0.
STEP_DR7 = {"sim": (0x400,), "host": (0,) if host_is_pvm() else (0x400,)}


@scenario(documented={"dr7": STEP_DR7})
def single_step_each_instruction(k: Any) -> dict[str, Any]:
    """ENABLE|SINGLESTEP: one DEBUG exit per instruction (exception 1, dr6 0xffff4ff0), pc = the
    linear address of the next instruction. Real mode runs with cs=0x100 (base 0x1000), so pc
    (0x1001...) differs from rip (1...). Turning single-step off (control 0) runs on to HLT."""
    out: dict[str, Any] = {}
    dr7s: set[int] = set()
    for mode in ("real", "prot32", "long64"):
        code = REAL_STEP_CODE if mode == "real" else STEP_CODE
        with machine(k, code, mode) as m:
            if mode == "real":
                sregs = m.sregs()
                sregs.cs.selector, sregs.cs.base = 0x100, CODE_ADDR
                m.set_sregs(sregs)
                m.update_regs(rip=0)
            enabled = set_guest_debug(m, STEP)
            steps = []
            for _ in range(4):
                reason = m.run()
                assert reason == KVM_EXIT_DEBUG, reason_name(reason)
                d = debug_exit(m)
                dr7s.add(d.pop("dr7"))
                steps.append(d)
            disabled = set_guest_debug(m, 0)
            then = reason_name(m.run())
            regs = m.regs()
        out[mode] = {
            "set": (enabled, disabled),
            "steps": steps,
            "then": (then, regs.rip, regs.rax & 0xFFFF, regs.rbx),
        }
    base = CODE_ADDR
    assert [(s["pc"], s["rip"]) for s in out["real"]["steps"]] == [
        (base + 1, 1),
        (base + 2, 2),
        (base + 5, 5),
        (base + 7, 7),
    ]
    assert out["real"]["then"] == ("HLT", 8, 0x1235, 0x1234)
    for mode in ("prot32", "long64"):
        assert [(s["pc"], s["rip"]) for s in out[mode]["steps"]] == [
            (0x1001, 0x1001),
            (0x1003, 0x1003),
            (0x1008, 0x1008),
            (0x100A, 0x100A),
        ]
        assert out[mode]["then"] == ("HLT", 0x100B, 0x1235, 0x1234)
    for mode in ("real", "prot32", "long64"):
        assert out[mode]["set"] == (0, 0)
        for s in out[mode]["steps"]:
            assert (s["exception"], s["dr6"]) == (1, DR6_BS)
    out["dr7"] = tuple(sorted(dr7s))
    return out


IO_STEP_CODE = (
    b"\x90"  # 1000: nop
    b"\xe6\x10"  # 1001: out 0x10, al
    b"\xe4\x11"  # 1003: in al, 0x11
    b"\x90"  # 1005: nop
    b"\xf4"  # 1006: hlt
    b"\xf4"  # 1007: hlt
)
# Upstream VMX: the OUT exits with rip on it; completing it on the next KVM_RUN is the step that
# reports DEBUG. The stepped HLT gives KVM_EXIT_HLT (kvm_emulate_halt overwrites the DEBUG exit).
VMX_IO_STEPS = (
    ("DEBUG", 1, 0x1001),
    ("IO", 0x10),
    ("DEBUG", 1, 0x1003),
    ("IO", 0x11),
    ("DEBUG", 1, 0x1005),
    ("DEBUG", 1, 0x1006),
    ("HLT", 0x1007),
)
# PVM: no DEBUG exit for the OUT (rip is already past it at the IO exit), and the HLT is stepped
# like any instruction: DEBUG with pc after it, the vCPU does not halt.
PVM_IO_STEPS = (
    ("DEBUG", 1, 0x1001),
    ("IO", 0x10),
    ("IO", 0x11),
    ("DEBUG", 1, 0x1005),
    ("DEBUG", 1, 0x1006),
    ("DEBUG", 1, 0x1007),
)


@scenario(
    documented={
        "exits": {"sim": VMX_IO_STEPS, "host": PVM_IO_STEPS if host_is_pvm() else VMX_IO_STEPS}
    }
)
def single_step_through_io_and_hlt(k: Any) -> dict[str, Any]:
    """Single-stepping `out`, `in`, `nop`, `hlt` (real mode): the exits in order, up to the one
    that leaves rip past the hlt. Both: the IN exit comes first and its completion is followed by
    DEBUG with pc after the IN; the IN's data lands in al."""
    exits = []
    with machine(k, IO_STEP_CODE) as m:
        set_guest_debug(m, STEP)
        for _ in range(MAX_RUNS):
            m.run()
            exits.append(step_exit(m))
            if m.exit_reason == KVM_EXIT_IO and m.io()["direction"] == 0:
                m.fill_in(b"\x5a")
            if m.regs().rip == 0x1007:
                break
        rax = m.regs().rax & 0xFF
    exits_t = tuple(exits)
    assert exits_t in (VMX_IO_STEPS, PVM_IO_STEPS), exits_t
    assert rax == 0x5A
    return {"exits": exits_t, "al": rax}


INT3_CODE = (
    b"\x90"  # 1000: nop
    b"\xcc"  # 1001: int3
    b"\x90"  # 1002: nop
    b"\xf4"  # 1003: hlt
)
BP_HANDLER = (
    b"\xb0\x03"  # 1800: mov al, 3
    b"\xe6\x33"  # 1802: out 0x33, al
    b"\xf4"  # 1804: hlt
)
VMX_SW_BP = {mode: ("DEBUG", 3, 0x1001, 0x1001) for mode in ("real", "prot32", "long64")}
PVM_SW_BP = {
    "real": ("IO", 0x33),  # the guest's own IVT[3] handler ran
    "prot32": ("INTERNAL_ERROR", 1, 0x1001),
    "long64": ("INTERNAL_ERROR", 1, 0x1001),
}


@scenario(
    documented={
        mode: {
            "sim": VMX_SW_BP[mode],
            "host": PVM_SW_BP[mode] if host_is_pvm() else VMX_SW_BP[mode],
        }
        for mode in VMX_SW_BP
    }
)
def sw_breakpoint_int3(k: Any) -> dict[str, Any]:
    """ENABLE|USE_SW_BP and `int3` in each mode (guest #BP handlers installed, so nothing hangs).

    Upstream VMX (the simulator): KVM_EXIT_DEBUG with exception 3, pc and rip AT the int3.
    PVM: real mode delivers #BP to the guest's IVT[3] handler (its OUT exit); 32/64-bit mode
    ends in KVM_EXIT_INTERNAL_ERROR (emulation) with rip on the int3."""
    out: dict[str, Any] = {}
    for mode in ("real", "prot32", "long64"):
        with machine(k, INT3_CODE, mode) as m:
            m.write(HANDLER_ADDR, BP_HANDLER)
            load_tables(m, mode, {3: HANDLER_ADDR})
            assert set_guest_debug(m, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP) == 0
            reason = m.run()
            if reason == KVM_EXIT_DEBUG:
                d = debug_exit(m)
                out[mode] = ("DEBUG", d["exception"], d["pc"], d["rip"])
            else:
                assert reason in (KVM_EXIT_IO, KVM_EXIT_INTERNAL_ERROR), reason_name(reason)
                out[mode] = summary(m, reason)
    for mode, value in out.items():
        assert value in (VMX_SW_BP[mode], PVM_SW_BP[mode]), (mode, value)
    return out


HW_BP_CODE = (
    b"\x90"  # 1000: nop
    b"\x90"  # 1001: nop
    b"\x90"  # 1002: nop (DR0)
    b"\x90"  # 1003: nop
    b"\xf4"  # 1004: hlt
)
# VMX reports GUEST_DR7, which with USE_HW_BP is the DR7 userspace set (0x1), with bit 10 as
# the CPU saves it; PVM reports 0.
HW_BP_DR7 = {"sim": 0x401, "host": 0 if host_is_pvm() else 0x401}


@scenario(documented={"dr7": HW_BP_DR7})
def hw_breakpoint_dr0(k: Any) -> dict[str, Any]:
    """ENABLE|USE_HW_BP with DR0=0x1002, DR7=L0 (real and long mode): DEBUG exit BEFORE the
    instruction (exception 1, pc = rip = 0x1002, dr6 B0 = 0xffff0ff1). RF is not set for the
    guest, so running again hits the same breakpoint; clearing the debug state runs to HLT."""
    out: dict[str, Any] = {}
    dr7s = set()
    for mode in ("real", "long64"):
        with machine(k, HW_BP_CODE, mode) as m:
            control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP
            r = set_guest_debug(m, control, {0: 0x1002, 7: DR7_L0})
            hits = []
            for _ in range(2):
                assert m.run() == KVM_EXIT_DEBUG
                d = debug_exit(m)
                dr7s.add(d.pop("dr7"))
                hits.append(d)
            set_guest_debug(m, 0)
            then = (reason_name(m.run()), m.regs().rip)
        out[mode] = {"set": r, "hits": hits, "then": then}
        assert r == 0 and then == ("HLT", 0x1005)
        assert hits == [{"exception": 1, "pc": 0x1002, "dr6": DR6_B0, "rip": 0x1002}] * 2
    assert len(dr7s) == 1
    out["dr7"] = dr7s.pop()
    return out


@scenario
def guest_debug_control_bits(k: Any) -> dict[str, Any]:
    """x86 accepts unknown KVM_SET_GUEST_DEBUG control bits (0x4, 0x80000000, all but INJECT_*).
    Without ENABLE the other bits are dropped: SINGLESTEP alone does not step; ENABLE with
    unknown bits and no SINGLESTEP runs normally."""
    out: dict[str, Any] = {}
    runs = {
        "singlestep_without_enable": KVM_GUESTDBG_SINGLESTEP,
        "enable_with_unknown_bits": KVM_GUESTDBG_ENABLE | 0x4 | 0x80000000,
    }
    with machine(k, b"\x90\xf4") as m:
        everything = 0xFFFFFFFF & ~(KVM_GUESTDBG_INJECT_BP | KVM_GUESTDBG_INJECT_DB)
        out["accepted"] = {
            "0x4": set_guest_debug(m, 0x4),
            "0x80000000": set_guest_debug(m, 0x80000000),
            "all_but_inject": set_guest_debug(m, everything),
            "0": set_guest_debug(m, 0),
        }
    for label, control in runs.items():
        with machine(k, b"\x90\xf4") as m:  # nop; hlt
            r = set_guest_debug(m, control)
            out[label] = (r, reason_name(m.run()), m.regs().rip)
    assert out["accepted"] == dict.fromkeys(out["accepted"], 0)
    assert out["singlestep_without_enable"] == (0, "HLT", 0x1002)
    assert out["enable_with_unknown_bits"] == (0, "HLT", 0x1002)
    return out


def vector_handler(mode: str, vector: int) -> bytes:
    """`mov al, vector; out 0x10, al` then iret (real), hlt (prot32) or iretq (long64)."""
    tail = {"real": b"\xcf", "prot32": b"\xf4", "long64": b"\x48\xcf"}[mode]
    return bytes([0xB0, vector, 0xE6, 0x10]) + tail


@scenario
def guest_debug_inject_bp_db(k: Any) -> dict[str, Any]:
    """INJECT_BP / INJECT_DB queue #BP / #DB for the guest (no ENABLE needed); a second call
    while it is still queued is EBUSY. The guest's handler gets a trap frame: ip = the next
    instruction to run (0x1000), no RF."""
    out: dict[str, Any] = {}
    width = {"real": 2, "prot32": 4, "long64": 8}
    for mode in ("real", "prot32", "long64"):
        for label, control in (("bp", KVM_GUESTDBG_INJECT_BP), ("db", KVM_GUESTDBG_INJECT_DB)):
            with machine(k, b"\x90\x90\xf4\xf4", mode) as m:
                m.write(HANDLER_ADDR, vector_handler(mode, 3))
                m.write(HANDLER_ADDR + 0x10, vector_handler(mode, 1))
                load_tables(m, mode, {3: HANDLER_ADDR, 1: HANDLER_ADDR + 0x10})
                calls = (set_guest_debug(m, control), set_guest_debug(m, control))
                reason = m.run()
                assert reason == KVM_EXIT_IO, reason_name(reason)
                vector = m.io()["data"]
                frame = stack(m, 3, width[mode])
                rsp = m.regs().rsp
            out[f"{label}_{mode}"] = {"calls": calls, "vector": vector, "frame": frame}
            assert calls == (0, "EBUSY")
            assert vector == (b"\x03" if label == "bp" else b"\x01")
            cs = 0 if mode == "real" else 0x08
            assert frame == (CODE_ADDR, cs, 0x2), (mode, label, frame)
            assert rsp < STACK_TOP
    return out
