"""Scenarios for KVM_RUN: IO and HLT exits, immediate_exit, the kvm_run header, OUT's rip.

Where the instruction pointer is at an OUT exit differs between upstream VMX/SVM KVM (on the OUT,
which the simulator follows) and this PVM host (past the OUT). Only `out_rip_documented_difference`
looks at rip at an OUT exit; every other scenario reads registers at IN or HLT exits, or after the
run that follows an OUT, where both agree.
"""

from __future__ import annotations

from typing import Any

from kvmlab.uapi import KVM_EXIT_HLT, KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_EXIT_MMIO

from .guest import CODE_ADDR, MAX_RUNS, Machine, machine, regs_dict
from .registry import host_is_pvm, scenario

HLT = b"\xf4"  # hlt


def run_to_hlt(m: Machine, answers: list[bytes] | None = None) -> list[dict[str, Any]]:
    """Run until HLT, recording every IO exit; IN exits are answered from `answers` in order.

    For IN exits the registers at the exit are recorded too (rip is on the IN on every backend).
    """
    pending = list(answers or [])
    exits: list[dict[str, Any]] = []
    for _ in range(MAX_RUNS):
        reason = m.run()
        if reason == KVM_EXIT_HLT:
            return exits
        assert reason == KVM_EXIT_IO, f"unexpected exit {reason}"
        io = m.io()
        if io["direction"] == KVM_EXIT_IO_IN:
            io["rax_at_exit"] = m.regs().rax
            io["rip_at_exit"] = m.regs().rip
            m.fill_in(pending.pop(0))
        exits.append(io)
    raise AssertionError(f"no HLT within {MAX_RUNS} runs")


# Real mode: OUT of 1, 2 and 4 bytes, to an immediate port and to dx.
OUT_CODE = (
    b"\xb0\x11"  # 1000: mov al, 0x11
    b"\xe6\x10"  # 1002: out 0x10, al
    b"\xb8\x33\x22"  # 1004: mov ax, 0x2233
    b"\xe7\x11"  # 1007: out 0x11, ax
    b"\x66\xb8\x77\x66\x55\x44"  # 1009: mov eax, 0x44556677
    b"\x66\xe7\x12"  # 100f: out 0x12, eax
    b"\xba\xf8\x03"  # 1012: mov dx, 0x3f8
    b"\xee"  # 1015: out dx, al
    b"\xef"  # 1016: out dx, ax
    b"\x66\xef"  # 1017: out dx, eax
    b"\xf4"  # 1019: hlt
)


@scenario
def out_sizes_and_ports(k: Any) -> dict[str, Any]:
    """OUT exits: direction 1, size, port, count 1, data_offset 0x1000, data bytes in page 1."""
    with machine(k, OUT_CODE) as m:
        exits = run_to_hlt(m)
        regs = regs_dict(m.regs())
    seen = [(e["size"], e["port"], e["data"]) for e in exits]
    assert seen == [
        (1, 0x10, b"\x11"),
        (2, 0x11, b"\x33\x22"),
        (4, 0x12, b"\x77\x66\x55\x44"),
        (1, 0x3F8, b"\x77"),
        (2, 0x3F8, b"\x77\x66"),
        (4, 0x3F8, b"\x77\x66\x55\x44"),
    ]
    for e in exits:
        assert (e["direction"], e["count"], e["data_offset"]) == (KVM_EXIT_IO_OUT, 1, 0x1000)
    assert regs["rip"] == CODE_ADDR + len(OUT_CODE)
    assert regs["rax"] == 0x44556677 and regs["rdx"] == 0x3F8
    return {"exits": exits, "regs_at_hlt": regs}


# Long mode: IN of 1, 2 and 4 bytes. al/ax merge into rax, eax zero-extends it.
IN_CODE = (
    b"\x66\xba\x40\x00"  # 1000: mov dx, 0x40
    b"\xec"  # 1004: in al, dx
    b"\x66\xe5\x41"  # 1005: in ax, 0x41
    b"\xed"  # 1008: in eax, dx
    b"\xf4"  # 1009: hlt
)


@scenario
def in_sizes_complete_on_next_run(k: Any) -> dict[str, Any]:
    """An IN exit waits on the IN; the next KVM_RUN loads the data userspace left in page 1."""
    with machine(k, IN_CODE, "long64") as m:
        m.update_regs(rax=0x1122334455667788)
        exits = run_to_hlt(m, [b"\xa1", b"\xb1\xb2", b"\xd4\xd3\xd2\xd1"])
        regs = regs_dict(m.regs())
    got = [(e["size"], e["port"], e["rip_at_exit"], e["rax_at_exit"]) for e in exits]
    assert got == [
        (1, 0x40, 0x1004, 0x1122334455667788),
        (2, 0x41, 0x1005, 0x11223344556677A1),  # in al kept rax[63:8]
        (4, 0x40, 0x1008, 0x112233445566B2B1),  # in ax kept rax[63:16]
    ]
    for e in exits:
        assert (e["direction"], e["count"], e["data_offset"]) == (KVM_EXIT_IO_IN, 1, 0x1000)
        assert e["data"] == bytes(e["size"])  # KVM zeroes the data bytes of an IN exit
    assert regs["rax"] == 0xD1D2D3D4  # in eax zero-extended into rax
    assert regs["rip"] == CODE_ADDR + len(IN_CODE)
    return {"exits": exits, "regs_at_hlt": regs}


@scenario
def in_exit_data_zeroed(k: Any) -> dict[str, Any]:
    """At an IN exit KVM has zeroed the count*size data bytes (no stale OUT data shows)."""
    code = (
        b"\x66\xb8\x77\x66\x55\x44"  # 1000: mov eax, 0x44556677
        b"\x66\xe7\x12"  # 1006: out 0x12, eax
        b"\xe4\x13"  # 1009: in al, 0x13
        b"\xf4"  # 100b: hlt
    )
    with machine(k, code) as m:
        exits = run_to_hlt(m, [b"\x99"])
        rax = m.regs().rax
    assert [(e["direction"], e["data"]) for e in exits] == [
        (KVM_EXIT_IO_OUT, b"\x77\x66\x55\x44"),
        (KVM_EXIT_IO_IN, b"\x00"),
    ]
    assert rax == 0x44556699
    return {"exits": exits, "rax": rax}


@scenario
def hlt_exit(k: Any) -> dict[str, Any]:
    """HLT exits with rip past the hlt; the next KVM_RUN resumes after it."""
    code = b"\x40" + HLT + b"\x43" + HLT  # inc ax; hlt; inc bx; hlt
    with machine(k, code) as m:
        first = m.run()
        regs1 = regs_dict(m.regs())
        second = m.run()
        regs2 = regs_dict(m.regs())
    assert (first, second) == (KVM_EXIT_HLT, KVM_EXIT_HLT)
    assert (regs1["rip"], regs1["rax"], regs1["rbx"]) == (CODE_ADDR + 2, 1, 0)
    assert (regs2["rip"], regs2["rax"], regs2["rbx"]) == (CODE_ADDR + 4, 1, 1)
    return {"exits": (first, second), "regs": (regs1, regs2)}


@scenario
def run_with_nonzero_arg(k: Any) -> dict[str, Any]:
    """KVM_RUN takes no argument: arg != 0 is EINVAL and nothing runs."""
    with machine(k, HLT) as m:
        bad = m.try_run(1)
        header = m.header()
        rip_after_bad = m.regs().rip
        good = m.try_run(0)
    out = {"bad": bad, "header": header, "rip": rip_after_bad, "good": good}
    assert bad == "EINVAL" and good == KVM_EXIT_HLT
    assert header == dict.fromkeys(header, 0)  # refused before the run: kvm_run untouched
    assert rip_after_bad == CODE_ADDR
    return out


@scenario
def immediate_exit_fresh_vcpu(k: Any) -> dict[str, Any]:
    """immediate_exit=1: KVM_RUN returns EINTR at once and leaves exit_reason as it was (0)."""
    with machine(k, HLT) as m:
        m.set_immediate_exit(1)
        r = m.try_run()
        header = m.header()
        rip = m.regs().rip
        m.set_immediate_exit(0)
        after = m.try_run()
    assert r == "EINTR"
    assert header["exit_reason"] == 0 and header["immediate_exit"] == 1
    assert rip == CODE_ADDR and after == KVM_EXIT_HLT
    return {"run": r, "header": header, "rip": rip, "then": after}


@scenario
def immediate_exit_after_hlt(k: Any) -> dict[str, Any]:
    """After an HLT exit, immediate_exit gives EINTR with exit_reason still HLT; nothing runs."""
    with machine(k, HLT + HLT) as m:
        first = m.run()
        m.set_immediate_exit(1)
        r = m.try_run()
        reason = m.exit_reason
        rip = m.regs().rip
        m.set_immediate_exit(0)
        second = m.try_run()
        rip2 = m.regs().rip
    out = {"first": first, "run": r, "exit_reason": reason, "rip": rip, "then": (second, rip2)}
    assert out == {
        "first": KVM_EXIT_HLT,
        "run": "EINTR",
        "exit_reason": KVM_EXIT_HLT,
        "rip": CODE_ADDR + 1,
        "then": (KVM_EXIT_HLT, CODE_ADDR + 2),
    }
    return out


@scenario
def immediate_exit_completes_pending_in(k: Any) -> dict[str, Any]:
    """With an IN pending, KVM_RUN + immediate_exit first completes the IN, then returns EINTR."""
    code = b"\xe4\x40" + HLT  # 1000: in al, 0x40; 1002: hlt
    with machine(k, code) as m:
        m.update_regs(rax=0x1234)
        first = m.run()
        io = m.io()
        m.fill_in(b"\x42")
        m.set_immediate_exit(1)
        r = m.try_run()
        reason = m.exit_reason
        regs = m.regs()
        m.set_immediate_exit(0)
        then = m.try_run()
        rip_hlt = m.regs().rip
    out = {
        "first": first,
        "io": io,
        "run": r,
        "exit_reason": reason,
        "rax": regs.rax,
        "rip": regs.rip,
        "then": (then, rip_hlt),
    }
    assert first == KVM_EXIT_IO and io["direction"] == KVM_EXIT_IO_IN
    assert (r, reason) == ("EINTR", KVM_EXIT_IO)
    assert (regs.rax, regs.rip) == (0x1242, CODE_ADDR + 2)
    assert out["then"] == (KVM_EXIT_HLT, CODE_ADDR + 3)
    return out


@scenario
def immediate_exit_completes_pending_out(k: Any) -> dict[str, Any]:
    """After an OUT exit, KVM_RUN + immediate_exit completes the OUT: rip is past it either way."""
    code = b"\xe6\x10" + HLT  # 1000: out 0x10, al; 1002: hlt
    with machine(k, code) as m:
        first = m.run()
        m.set_immediate_exit(1)
        r = m.try_run()
        reason = m.exit_reason
        rip = m.regs().rip
        m.set_immediate_exit(0)
        then = m.try_run()
        rip_hlt = m.regs().rip
    out = {"first": first, "run": r, "exit_reason": reason, "rip": rip, "then": (then, rip_hlt)}
    assert out == {
        "first": KVM_EXIT_IO,
        "run": "EINTR",
        "exit_reason": KVM_EXIT_IO,
        "rip": CODE_ADDR + 2,
        "then": (KVM_EXIT_HLT, CODE_ADDR + 3),
    }
    return out


@scenario
def run_header_after_exit(k: Any) -> dict[str, Any]:
    """kvm_run's header after HLT, with IF clear and set: if_flag, ready_for_interrupt_injection,
    flags 0, cr8 and apic_base (0xfee00900 for the BSP)."""
    out: dict[str, Any] = {}
    for label, rflags in (("if0", 0x2), ("if1", 0x202)):
        with machine(k, HLT) as m:
            m.update_regs(rflags=rflags)
            before = m.header()
            m.run()
            out[label] = {"before": before, "after": m.header()}
    assert out["if0"]["before"] == dict.fromkeys(out["if0"]["before"], 0)
    assert out["if0"]["after"] == {
        "request_interrupt_window": 0,
        "immediate_exit": 0,
        "exit_reason": KVM_EXIT_HLT,
        "ready_for_interrupt_injection": 0,
        "if_flag": 0,
        "flags": 0,
        "cr8": 0,
        "apic_base": 0xFEE00900,
    }
    assert out["if1"]["after"]["if_flag"] == 1
    assert out["if1"]["after"]["ready_for_interrupt_injection"] == 1
    return out


@scenario
def run_cr8_loaded_on_entry(k: Any) -> dict[str, Any]:
    """kvm_run.cr8 is loaded into the vCPU on entry and reported back; > 15 is EINVAL."""
    with machine(k, HLT + HLT) as m:
        m.set_run_cr8(5)
        first = m.try_run()
        cr8_run = m.header()["cr8"]
        cr8_sregs = m.sregs().cr8
        m.set_run_cr8(16)
        bad = m.try_run()
        rip = m.regs().rip
    out = {"first": first, "cr8_run": cr8_run, "cr8_sregs": cr8_sregs, "bad": bad, "rip": rip}
    assert out == {
        "first": KVM_EXIT_HLT,
        "cr8_run": 5,
        "cr8_sregs": 5,
        "bad": "EINVAL",
        "rip": CODE_ADDR + 1,
    }
    return out


# Real mode: out 0x10, al; nop; hlt
OUT_RIP_CODE = (
    b"\xe6\x10"  # 1000: out 0x10, al
    b"\x90"  # 1002: nop
    b"\xf4"  # 1003: hlt
)
OUT_ADDR = CODE_ADDR
AFTER_OUT = CODE_ADDR + 2


@scenario(
    documented={
        # Upstream VMX/SVM (and the simulator) leave rip ON the OUT until the next KVM_RUN;
        # PVM's emulator path has already advanced it past the OUT when userspace sees the exit.
        "rip_at_out": {"sim": OUT_ADDR, "host": AFTER_OUT if host_is_pvm() else OUT_ADDR},
    }
)
def out_rip_documented_difference(k: Any) -> dict[str, Any]:
    """rip at an OUT exit (the one documented difference), then agreement after the next run."""
    with machine(k, OUT_RIP_CODE) as m:
        first = m.run()
        io = m.io()
        rip_at_out = m.regs().rip
        second = m.run()
        rip_at_hlt = m.regs().rip
    assert first == KVM_EXIT_IO and io["port"] == 0x10
    assert rip_at_out in (OUT_ADDR, AFTER_OUT)
    assert (second, rip_at_hlt) == (KVM_EXIT_HLT, CODE_ADDR + len(OUT_RIP_CODE))
    return {"exit": first, "io": io, "rip_at_out": rip_at_out, "then": (second, rip_at_hlt)}


@scenario
def immediate_exit_completes_pending_mmio_read(k: Any) -> dict[str, Any]:
    """With an MMIO read pending, KVM_RUN + immediate_exit first loads the data and retires
    the instruction, then returns EINTR with exit_reason still MMIO."""
    code = b"\xa1\x00\x00\x10\x00" + HLT  # 1000: mov eax, [0x100000]; 1005: hlt
    with machine(k, code, "prot32") as m:
        first = m.run()
        m.runmap[40:44] = b"\x78\x56\x34\x12"  # run->mmio.data
        m.set_immediate_exit(1)
        r = m.try_run()
        reason = m.exit_reason
        regs = m.regs()
        m.set_immediate_exit(0)
        then = (m.try_run(), m.regs().rip)
    out = {"first": first, "run": r, "exit_reason": reason, "rax": regs.rax, "rip": regs.rip}
    out["then"] = then
    assert first == KVM_EXIT_MMIO
    assert (r, reason, regs.rax, regs.rip) == ("EINTR", KVM_EXIT_MMIO, 0x12345678, 0x1005)
    assert then == (KVM_EXIT_HLT, 0x1006)
    return out
