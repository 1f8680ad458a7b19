"""Scenarios for guest faults: exceptions delivered to the guest's own handlers, triple faults
(KVM_EXIT_SHUTDOWN) and execution where no slot is (KVM_EXIT_INTERNAL_ERROR, kvm-api-notes §4.1).

Protected and long mode need descriptor tables in guest memory for delivery: `load_tables` writes
a flat GDT (null, code 0x08, data 0x10) at GDT_ADDR and interrupt gates at IDT_ADDR, and points
GDTR/IDTR at them. Handlers live at HANDLER_ADDR. The other scenario modules reuse these helpers.

PVM≠VMX: PVM runs real-mode and 32-bit guests through KVM's instruction emulator, which cannot
execute a protected-mode `int n` or `iret` (emulation failure); exceptions raised by the CPU
(#UD, #DE, #GP, #PF) are delivered normally. `protected_mode_int_and_iret` and
`real_mode_idt_limit` document this; every other scenario avoids both instructions outside real
mode, and handlers end in `hlt` so the frame they were given can be read from guest memory.
"""

from __future__ import annotations

import struct
from typing import Any

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_SHUTDOWN,
)

from .guest import STACK_TOP, Machine, machine
from .registry import host_is_pvm, scenario

GDT_ADDR = 0x600
IDT_ADDR = 0x3000
HANDLER_ADDR = 0x1800
GDT_CODE32 = 0x00CF9A000000FFFF  # flat 4 GiB ring-0 code, 32-bit
GDT_CODE64 = 0x00AF9A000000FFFF  # ring-0 code, L=1
GDT_DATA = 0x00CF92000000FFFF  # flat 4 GiB ring-0 data, writable
GATE_INT = 0x8E  # present, DPL 0, interrupt gate (32-bit, or 64-bit in long mode)
RF = 1 << 16  # RFLAGS.RF: set in the image pushed for a fault

# Exception vectors
DE, NMI, BP, UD, GP, PF = 0, 2, 3, 6, 13, 14


def load_tables(m: Machine, mode: str, gates: dict[int, int], idt_limit: int | None = None) -> None:
    """Install handlers `gates` (vector -> address) for `mode`.

    Real mode: IVT entries at 0:0. Protected/long mode: a GDT matching machine()'s cached
    selectors and an IDT of interrupt gates through selector 0x08; IDTR.limit covers all 256
    vectors unless `idt_limit` is given.
    """
    if mode == "real":
        for vector, handler in gates.items():
            struct.pack_into("<HH", m.mem, vector * 4, handler, 0)
        if idt_limit is not None:
            sregs = m.sregs()
            sregs.idt.limit = idt_limit
            m.set_sregs(sregs)
        return
    long = mode == "long64"
    code = GDT_CODE64 if long else GDT_CODE32
    struct.pack_into("<QQQ", m.mem, GDT_ADDR, 0, code, GDT_DATA)
    size = 16 if long else 8
    for vector, handler in gates.items():
        low = (
            (handler & 0xFFFF) | (0x08 << 16) | (GATE_INT << 40) | ((handler >> 16) & 0xFFFF) << 48
        )
        struct.pack_into("<Q", m.mem, IDT_ADDR + size * vector, low)
        if long:
            struct.pack_into("<Q", m.mem, IDT_ADDR + size * vector + 8, handler >> 32)
    sregs = m.sregs()
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, 3 * 8 - 1
    sregs.idt.base = IDT_ADDR
    sregs.idt.limit = 256 * size - 1 if idt_limit is None else idt_limit
    m.set_sregs(sregs)


def stack(m: Machine, count: int, width: int) -> tuple[int, ...]:
    """`count` words of `width` bytes at the guest's current rsp (the frame a handler got)."""
    rsp = m.regs().rsp
    fmt = {2: "H", 4: "I", 8: "Q"}[width]
    return struct.unpack_from(f"<{count}{fmt}", m.mem, rsp)


def reason_name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, str(reason))


def internal_error(m: Machine) -> dict[str, Any]:
    """suberror, ndata and the data words of an INTERNAL_ERROR exit."""
    r = m.kvm_run()
    n = r.internal.ndata
    return {
        "suberror": r.internal.suberror,
        "ndata": n,
        "data": tuple(r.internal.data[: min(n, 16)]),
    }


def summary(m: Machine, reason: int) -> tuple[Any, ...]:
    """A short comparable description of an exit: its name, rip and (for errors) suberror."""
    rip = m.regs().rip
    if reason == KVM_EXIT_INTERNAL_ERROR:
        return ("INTERNAL_ERROR", internal_error(m)["suberror"], rip)
    if reason == KVM_EXIT_IO:
        return ("IO", m.io()["port"])  # rip at an OUT exit differs on PVM
    return (reason_name(reason), rip)


# --- triple faults ------------------------------------------------------------------------------

UD2 = b"\x0f\x0b"
PF_CODE = (
    b"\xb8\x00\x00\x00\x40"  # 1000: mov eax, 0x40000000 (not mapped: PDPT[1] is empty)
    b"\x8b\x18"  # 1005: mov ebx, dword ptr [rax]
    b"\xf4"  # 1007: hlt
)


@scenario
def triple_fault_shutdown(k: Any) -> dict[str, Any]:
    """An exception that cannot be delivered escalates to #DF and then a triple fault:
    KVM_EXIT_SHUTDOWN with rip at the faulting instruction.

    ud2 with IDTR.limit 0 (32-bit and 64-bit), and a 64-bit #PF with an IDT of empty gates.
    rflags has RF set (0x10002 on the host), as for a fault being delivered."""
    out: dict[str, Any] = {}
    cases = (
        ("ud2_prot32", UD2 + b"\xf4", "prot32", 0),
        ("ud2_long64", UD2 + b"\xf4", "long64", 0),
        ("pf_long64", PF_CODE, "long64", None),
    )
    for label, code, mode, limit in cases:
        with machine(k, code, mode) as m:
            load_tables(m, mode, {}, idt_limit=limit)
            reason = m.run()
            regs = m.regs()
            out[label] = {
                "exit": reason_name(reason),
                "rip": regs.rip,
                "rflags": regs.rflags,
                "cr2": m.sregs().cr2,
            }
    for label in ("ud2_prot32", "ud2_long64"):
        assert (out[label]["exit"], out[label]["rip"], out[label]["cr2"]) == ("SHUTDOWN", 0x1000, 0)
        # KVM queued the intercepted #UD as a fault, which sets RF before injecting it.
        assert out[label]["rflags"] == RF | 0x2
    assert (out["pf_long64"]["exit"], out["pf_long64"]["rip"]) == ("SHUTDOWN", 0x1005)
    assert out["pf_long64"]["cr2"] == 0x40000000
    return out


# --- execution where no memory is ----------------------------------------------------------------

NO_SLOT = 0x20000  # past machine()'s 64 KiB slot
JUMP_CODE = {
    "real": b"\xea\x00\x00\x00\x20",  # 1000: jmp 0x2000:0000 (linear 0x20000)
    "prot32": b"\xb8\x00\x00\x02\x00\xff\xe0",  # 1000: mov eax, 0x20000; jmp eax
    "long64": b"\xb8\x00\x00\x02\x00\xff\xe0",  # 1000: mov eax, 0x20000; jmp rax
}
# internal.data[1..5] of an emulation failure are the vendor's exit information: exit reason,
# qualification, IDT-vectoring info, interruption info, error code. Upstream VMX (the simulator)
# reports EXIT_REASON_EPT_VIOLATION (48) with qualification 0x184 (instruction fetch, linear
# address valid, translated access); PVM reports 0x1000 and zeros.
VMX_FETCH_EXIT_INFO = (48, 0x184, 0, 0, 0)
PVM_FETCH_EXIT_INFO = (0x1000, 0, 0, 0, 0)


@scenario(
    documented={
        "exit_info": {
            "sim": (VMX_FETCH_EXIT_INFO,) * 3,
            "host": (PVM_FETCH_EXIT_INFO if host_is_pvm() else VMX_FETCH_EXIT_INFO,) * 3,
        }
    }
)
def exec_from_unbacked_gpa(k: Any) -> dict[str, Any]:
    """Jumping to GPA 0x20000, where no slot is, in each mode: KVM_EXIT_INTERNAL_ERROR with
    suberror 1 (EMULATION), ndata 6 and data[0] = 0 (no instruction bytes: nothing could be
    fetched), rip at the target. data[1..5] are vendor exit information (documented)."""
    out: dict[str, Any] = {}
    info = []
    for mode in ("real", "prot32", "long64"):
        with machine(k, JUMP_CODE[mode], mode) as m:
            reason = m.run()
            err = internal_error(m)
            out[mode] = {
                "exit": reason_name(reason),
                "suberror": err["suberror"],
                "ndata": err["ndata"],
                "flags": err["data"][0] if err["data"] else None,
                "rip": m.regs().rip,
                "cs_base": m.sregs().cs.base,
            }
            info.append(err["data"][1:6])
    assert out["real"] == {
        "exit": "INTERNAL_ERROR",
        "suberror": 1,
        "ndata": 6,
        "flags": 0,
        "rip": 0,
        "cs_base": NO_SLOT,
    }
    for mode in ("prot32", "long64"):
        assert out[mode] == {**out["real"], "rip": NO_SLOT, "cs_base": 0}
    out["exit_info"] = tuple(info)
    return out


# --- exceptions delivered to the guest ---------------------------------------------------------

OUT_IRET_16 = (
    b"\xb0\x21"  # 1800: mov al, 0x21
    b"\xe6\x10"  # 1802: out 0x10, al
    b"\xcf"  # 1804: iret
)
HLT = b"\xf4"
DIV0_16 = (
    b"\x31\xdb"  # 1000: xor bx, bx
    b"\xb8\x07\x00"  # 1002: mov ax, 7
    b"\xf6\xf3"  # 1005: div bl
    b"\xf4"  # 1007: hlt
)


@scenario
def real_mode_exceptions(k: Any) -> dict[str, Any]:
    """Real mode through the IVT: `int 0x21` to a handler that outs and irets (frame ip = after
    the int), then HLT back in the main code; ud2 to #UD and div by zero to #DE, whose frames
    (ip, cs, flags) point AT the faulting instruction."""
    out: dict[str, Any] = {}
    with machine(k, b"\xcd\x21" + HLT) as m:  # 1000: int 0x21; 1002: hlt
        m.write(HANDLER_ADDR, OUT_IRET_16)
        load_tables(m, "real", {0x21: HANDLER_ADDR})
        first = m.run()
        io = m.io()
        frame = stack(m, 3, 2)
        second = m.run()
        out["int21"] = {
            "exits": (reason_name(first), reason_name(second)),
            "io": (io["port"], io["data"]),
            "frame": frame,
            "hlt_rip": m.regs().rip,
            "rsp": m.regs().rsp,
        }
    for label, code, vector in (("ud2", UD2 + HLT, UD), ("div0", DIV0_16, DE)):
        with machine(k, code) as m:
            m.write(HANDLER_ADDR, HLT)
            load_tables(m, "real", {vector: HANDLER_ADDR})
            reason = m.run()
            out[label] = {
                "exit": reason_name(reason),
                "rip": m.regs().rip,
                "frame": stack(m, 3, 2),
                "rsp": m.regs().rsp,
            }
    assert out["int21"] == {
        "exits": ("IO", "HLT"),
        "io": (0x10, b"\x21"),
        "frame": (0x1002, 0, 0x2),
        "hlt_rip": 0x1003,
        "rsp": STACK_TOP,
    }
    assert out["ud2"] == {
        "exit": "HLT",
        "rip": HANDLER_ADDR + 1,
        "frame": (0x1000, 0, 0x2),
        "rsp": STACK_TOP - 6,
    }
    assert out["div0"]["frame"] == (0x1005, 0, 0x46)  # ZF, PF from xor bx, bx
    return out


DIV0_32 = (
    b"\x31\xdb"  # 1000: xor ebx, ebx
    b"\xb8\x07\x00\x00\x00"  # 1002: mov eax, 7
    b"\xf6\xf3"  # 1007: div bl
    b"\xf4"  # 1009: hlt
)
GP_CODE = (
    b"\x66\xb8\x28\x00"  # 1000: mov ax, 0x28 (past the GDT limit)
    b"\x8e\xd8"  # 1004: mov ds, eax
    b"\xf4"  # 1006: hlt
)
FAULTS = (("ud2", UD2 + HLT, UD), ("div0", DIV0_32, DE), ("gp", GP_CODE, GP))


def fault_frames(k: Any, mode: str, width: int) -> dict[str, Any]:
    """Each of FAULTS with a `hlt` handler: the exit and the frame the handler was given."""
    out: dict[str, Any] = {}
    for label, code, vector in FAULTS:
        words = 4 if vector == GP else 3
        with machine(k, code, mode) as m:
            m.write(HANDLER_ADDR, HLT)
            load_tables(m, mode, {vector: HANDLER_ADDR})
            reason = m.run()
            out[label] = {
                "exit": reason_name(reason),
                "rip": m.regs().rip,
                "rsp": m.regs().rsp,
                "frame": stack(m, words if mode == "prot32" else words + 2, width),
            }
    return out


@scenario
def prot32_exception_frames(k: Any) -> dict[str, Any]:
    """32-bit protected mode, IDT interrupt gates: #UD and #DE push eip (AT the faulting
    instruction), cs, eflags (with RF); #GP from loading selector 0x28 past the GDT limit also
    pushes the error code 0x28 first."""
    out = fault_frames(k, "prot32", 4)
    assert out["ud2"] == {
        "exit": "HLT",
        "rip": HANDLER_ADDR + 1,
        "rsp": STACK_TOP - 12,
        "frame": (0x1000, 0x08, RF | 0x2),
    }
    assert out["div0"]["frame"] == (0x1007, 0x08, RF | 0x46)
    assert out["gp"]["frame"] == (0x28, 0x1004, 0x08, RF | 0x2)
    assert out["gp"]["rsp"] == STACK_TOP - 16
    return out


UD_SKIP_IRETQ = (
    b"\x48\x83\x04\x24\x02"  # 1800: add qword ptr [rsp], 2 (skip the ud2)
    b"\x48\xcf"  # 1805: iretq
)


@scenario
def long64_exception_frames(k: Any) -> dict[str, Any]:
    """Long mode, 64-bit IDT gates: frames of rip, cs, rflags (RF set), rsp, ss (+ the error
    code for #GP). A #UD handler that advances the saved rip past the ud2 and returns with
    iretq resumes the main code (HLT there, RF clear again)."""
    out = fault_frames(k, "long64", 8)
    with machine(k, UD2 + HLT, "long64") as m:
        m.write(HANDLER_ADDR, UD_SKIP_IRETQ)
        load_tables(m, "long64", {UD: HANDLER_ADDR})
        reason = m.run()
        regs = m.regs()
        out["ud2_iretq"] = {
            "exit": reason_name(reason),
            "rip": regs.rip,
            "rsp": regs.rsp,
            "rflags": regs.rflags,
            "frame": struct.unpack_from("<5Q", m.mem, STACK_TOP - 40),
        }
    assert out["ud2"] == {
        "exit": "HLT",
        "rip": HANDLER_ADDR + 1,
        "rsp": STACK_TOP - 40,
        "frame": (0x1000, 0x08, RF | 0x2, STACK_TOP, 0x10),
    }
    assert out["div0"]["frame"] == (0x1007, 0x08, RF | 0x46, STACK_TOP, 0x10)
    assert out["gp"]["frame"] == (0x28, 0x1004, 0x08, RF | 0x2, STACK_TOP, 0x10)
    assert out["ud2_iretq"] == {
        "exit": "HLT",
        "rip": 0x1003,
        "rsp": STACK_TOP,
        "rflags": 0x2,  # iretq restored RF; the hlt that retired after it cleared it
        "frame": (0x1002, 0x08, RF | 0x2, STACK_TOP, 0x10),
    }
    return out


# --- documented: what PVM's emulator cannot do --------------------------------------------------

INT21 = b"\xcd\x21" + HLT  # 1000: int 0x21; 1002: hlt
UD_SKIP_IRETD = (
    b"\x83\x04\x24\x02"  # 1800: add dword ptr [esp], 2 (skip the ud2)
    b"\xcf"  # 1804: iretd
)
VMX_EMULATOR_GAPS = {
    "int21_prot32": ("HLT", HANDLER_ADDR + 1),
    "int21_long64": ("HLT", HANDLER_ADDR + 1),
    "iretd_prot32": ("HLT", 0x1003),
}
PVM_EMULATOR_GAPS = {
    "int21_prot32": ("INTERNAL_ERROR", 1, 0x1000),
    "int21_long64": ("INTERNAL_ERROR", 1, 0x1000),
    "iretd_prot32": ("INTERNAL_ERROR", 1, 0x1804),
}


@scenario(
    documented={
        key: {"sim": VMX_EMULATOR_GAPS[key], "host": PVM_EMULATOR_GAPS[key]}
        if host_is_pvm()
        else {"sim": VMX_EMULATOR_GAPS[key], "host": VMX_EMULATOR_GAPS[key]}
        for key in VMX_EMULATOR_GAPS
    }
)
def protected_mode_int_and_iret(k: Any) -> dict[str, Any]:
    """`int 0x21` in 32-bit and 64-bit mode, and `iretd` in 32-bit mode.

    Upstream VMX (the simulator) runs them on the CPU: the int reaches its handler (HLT there),
    the iretd returns past the ud2 it handled. PVM hands them to KVM's emulator, which does not
    implement protected-mode INT/IRET: KVM_EXIT_INTERNAL_ERROR suberror 1 with rip on the
    instruction (the instruction bytes are in data[1..2], ndata 8)."""
    out: dict[str, Any] = {}
    for mode in ("prot32", "long64"):
        with machine(k, INT21, mode) as m:
            m.write(HANDLER_ADDR, HLT)
            load_tables(m, mode, {0x21: HANDLER_ADDR})
            out[f"int21_{mode}"] = summary(m, m.run())
    with machine(k, UD2 + HLT, "prot32") as m:
        m.write(HANDLER_ADDR, UD_SKIP_IRETD)
        load_tables(m, "prot32", {UD: HANDLER_ADDR})
        out["iretd_prot32"] = summary(m, m.run())
    for key, value in out.items():
        assert value in (VMX_EMULATOR_GAPS[key], PVM_EMULATOR_GAPS[key]), (key, value)
    return out


@scenario(
    documented={
        "exit": {
            "sim": ("SHUTDOWN", 0x1000),
            "host": ("IO", 0x10) if host_is_pvm() else ("SHUTDOWN", 0x1000),
        }
    }
)
def real_mode_idt_limit(k: Any) -> dict[str, Any]:
    """Real mode `int 0x21` with IDTR.limit 0 but a valid IVT entry. Upstream VMX checks the
    limit: #GP, #DF, triple fault -> SHUTDOWN with rip on the int. PVM's emulator ignores the
    limit and runs the handler (its OUT exit)."""
    with machine(k, INT21) as m:
        m.write(HANDLER_ADDR, OUT_IRET_16)
        load_tables(m, "real", {0x21: HANDLER_ADDR}, idt_limit=0)
        reason = m.run()
        result = summary(m, reason)
    assert reason in (KVM_EXIT_SHUTDOWN, KVM_EXIT_IO), reason
    return {"exit": result}
