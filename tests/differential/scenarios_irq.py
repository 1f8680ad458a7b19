"""Scenarios for interrupts without an in-kernel irqchip: KVM_INTERRUPT, KVM_NMI, the interrupt
window (request_interrupt_window / KVM_EXIT_IRQ_WINDOW_OPEN) and the kvm_run header's
ready_for_interrupt_injection and if_flag (kvm-api-notes §4.1, §4.3).

KVM_INTERRUPT marks a vector as injected; upstream VMX/SVM deliver it on the next entry without
checking IF (userspace must wait for the window), and so did this host in every mode. Handlers
report their vector with `out 0x10, al`; rip is never recorded at those OUT exits (it differs on
PVM). 32-bit handlers end in `hlt` instead of `iretd` (PVM cannot emulate a protected-mode iret,
see scenarios_faults).

PVM≠VMX: the host seldom produces KVM_EXIT_IRQ_WINDOW_OPEN: only when its vCPU thread is
rescheduled mid-run, at whatever instruction that happens (`irq_window_open` documents it).
"""

from __future__ import annotations

from typing import Any

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_INTERRUPT,
    KVM_NMI,
    kvm_interrupt,
)

from .guest import CODE_ADDR, MAX_RUNS, STACK_TOP, Machine, machine, try_ioctl
from .registry import OneOf, host_is_pvm, scenario
from .scenarios_faults import HANDLER_ADDR, NMI, load_tables, stack

IF = 1 << 9  # RFLAGS.IF
VECTOR = 0x20
MAIN = (
    b"\x90"  # 1000: nop
    b"\x90"  # 1001: nop
    b"\xf4"  # 1002: hlt
    b"\xf4"  # 1003: hlt
)
FRAME = {"real": (3, 2), "prot32": (3, 4), "long64": (5, 8)}  # words, width of an int frame


def handler(mode: str, vector: int) -> bytes:
    """`mov al, vector; out 0x10, al` then iret (real), hlt (prot32) or iretq (long64)."""
    tail = {"real": b"\xcf", "prot32": b"\xf4", "long64": b"\x48\xcf"}[mode]
    return bytes([0xB0, vector, 0xE6, 0x10]) + tail


def interrupt(m: Machine, irq: int) -> int | str:
    """KVM_INTERRUPT: 0 or the errno name."""
    return try_ioctl(m.k, m.vcpu_fd, KVM_INTERRUPT, bytes(kvm_interrupt(irq=irq)))


def name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason, str(reason))


def run_through_handler(m: Machine, mode: str) -> dict[str, Any]:
    """Run: expect the handler's OUT (record vector and frame), then HLT (record rip, rflags)."""
    first = m.run()
    assert first == KVM_EXIT_IO, name(first)
    words, width = FRAME[mode]
    out: dict[str, Any] = {"vector": m.io()["data"], "frame": stack(m, words, width)}
    second = m.run()
    regs = m.regs()
    out["then"] = (name(second), regs.rip, regs.rflags, regs.rsp)
    return out


@scenario
def interrupt_invalid_vector(k: Any) -> dict[str, Any]:
    """KVM_INTERRUPT takes vectors 0..255: 256 and 0xffffffff are EINVAL, 255 is accepted."""
    with machine(k, MAIN) as m:
        out = {
            "256": interrupt(m, 256),
            "0xffffffff": interrupt(m, 0xFFFFFFFF),
            "255": interrupt(m, 255),
        }
    assert out == {"256": "EINVAL", "0xffffffff": "EINVAL", "255": 0}
    return out


@scenario
def interrupt_real_mode(k: Any) -> dict[str, Any]:
    """Real mode, IVT: a vector injected after an HLT exit (IF=1) runs its handler, which irets
    to the code after the hlt; one injected before the first run with IF=0 is delivered anyway
    (KVM_INTERRUPT does not check IF). Frames are ip, cs, flags."""
    out: dict[str, Any] = {}
    with machine(k, MAIN) as m:
        m.write(HANDLER_ADDR, handler("real", VECTOR))
        load_tables(m, "real", {VECTOR: HANDLER_ADDR})
        m.update_regs(rflags=0x2 | IF)
        first = m.run()
        out["first"] = (name(first), m.regs().rip)
        out["inject"] = interrupt(m, VECTOR)
        out["after_hlt"] = run_through_handler(m, "real")
    with machine(k, MAIN) as m:
        m.write(HANDLER_ADDR, handler("real", VECTOR))
        load_tables(m, "real", {VECTOR: HANDLER_ADDR})
        out["inject_if0"] = interrupt(m, VECTOR)
        out["if0"] = run_through_handler(m, "real")
    assert out["first"] == ("HLT", 0x1003) and out["inject"] == 0
    assert out["after_hlt"] == {
        "vector": b"\x20",
        "frame": (0x1003, 0, 0x2 | IF),
        "then": ("HLT", 0x1004, 0x2 | IF, STACK_TOP),
    }
    assert out["inject_if0"] == 0
    assert out["if0"] == {
        "vector": b"\x20",
        "frame": (CODE_ADDR, 0, 0x2),
        "then": ("HLT", 0x1003, 0x2, STACK_TOP),
    }
    return out


@scenario
def interrupt_prot32(k: Any) -> dict[str, Any]:
    """32-bit protected mode, IDT interrupt gate: the injected vector's handler gets eip, cs,
    eflags (IF set); the gate clears IF, so the HLT in the handler reports if_flag 0 and
    ready_for_interrupt_injection 0."""
    with machine(k, MAIN, "prot32") as m:
        m.write(HANDLER_ADDR, handler("prot32", VECTOR))
        load_tables(m, "prot32", {VECTOR: HANDLER_ADDR})
        m.update_regs(rflags=0x2 | IF)
        inject = interrupt(m, VECTOR)
        out = run_through_handler(m, "prot32")
        header = m.header()
    out["inject"] = inject
    out["at_hlt"] = (header["ready_for_interrupt_injection"], header["if_flag"])
    assert out == {
        "vector": b"\x20",
        "frame": (CODE_ADDR, 0x08, 0x2 | IF),
        "then": ("HLT", HANDLER_ADDR + 5, 0x2, STACK_TOP - 12),
        "inject": 0,
        "at_hlt": (0, 0),
    }
    return out


@scenario
def interrupt_long64(k: Any) -> dict[str, Any]:
    """Long mode, 64-bit IDT gate: the handler gets rip, cs, rflags, rsp, ss and returns with
    iretq; the main code then runs on to HLT with IF set again."""
    with machine(k, MAIN, "long64") as m:
        m.write(HANDLER_ADDR, handler("long64", VECTOR))
        load_tables(m, "long64", {VECTOR: HANDLER_ADDR})
        m.update_regs(rflags=0x2 | IF)
        inject = interrupt(m, VECTOR)
        out = run_through_handler(m, "long64")
        header = m.header()
    out["inject"] = inject
    out["at_hlt"] = (header["ready_for_interrupt_injection"], header["if_flag"])
    assert out == {
        "vector": b"\x20",
        "frame": (CODE_ADDR, 0x08, 0x2 | IF, STACK_TOP, 0x10),
        "then": ("HLT", 0x1003, 0x2 | IF, STACK_TOP),
        "inject": 0,
        "at_hlt": (1, 1),
    }
    return out


@scenario
def interrupt_replaced_before_delivery(k: Any) -> dict[str, Any]:
    """Without an irqchip a second KVM_INTERRUPT before the next run replaces the first: only
    the last vector is delivered. KVM_GET_SREGS shows the queued vector in interrupt_bitmap
    until then, and an empty bitmap after."""
    with machine(k, MAIN) as m:
        m.write(HANDLER_ADDR, handler("real", 0x20))
        m.write(HANDLER_ADDR + 0x10, handler("real", 0x21))
        load_tables(m, "real", {0x20: HANDLER_ADDR, 0x21: HANDLER_ADDR + 0x10})
        results = (interrupt(m, 0x20), interrupt(m, 0x21))
        bitmap = tuple(m.sregs().interrupt_bitmap)
        delivered = run_through_handler(m, "real")
        bitmap_after = tuple(m.sregs().interrupt_bitmap)
    out = {"results": results, "bitmap": bitmap, "delivered": delivered, "after": bitmap_after}
    assert results == (0, 0)
    assert bitmap == (1 << 0x21, 0, 0, 0) and bitmap_after == (0, 0, 0, 0)
    assert delivered["vector"] == b"\x21"
    return out


HEADER_CODE = (
    b"\xfa"  # 1000: cli
    b"\xe6\x10"  # 1001: out 0x10, al
    b"\xfb"  # 1003: sti
    b"\x90"  # 1004: nop
    b"\xe6\x11"  # 1005: out 0x11, al
    b"\xfa"  # 1007: cli
    b"\xf4"  # 1008: hlt
    b"\xfb"  # 1009: sti
    b"\xf4"  # 100a: hlt
)


@scenario
def ready_for_injection_after_cli_sti(k: Any) -> dict[str, Any]:
    """kvm_run.if_flag and ready_for_interrupt_injection follow IF at each exit (after cli: 0/0,
    after sti + nop: 1/1) in real, 32-bit and 64-bit mode."""
    out: dict[str, Any] = {}
    for mode in ("real", "prot32", "long64"):
        seen = []
        with machine(k, HEADER_CODE, mode) as m:
            m.update_regs(rflags=0x2 | IF)
            for _ in range(4):
                reason = m.run()
                header = m.header()
                entry: tuple[Any, ...] = (
                    name(reason),
                    header["ready_for_interrupt_injection"],
                    header["if_flag"],
                )
                if reason == KVM_EXIT_HLT:
                    entry += (m.regs().rip,)
                seen.append(entry)
        out[mode] = seen
        assert seen == [
            ("IO", 0, 0),
            ("IO", 1, 1),
            ("HLT", 0, 0, 0x1009),
            ("HLT", 1, 1, 0x100B),
        ], (mode, seen)
    return out


WINDOW_CODE = (
    b"\x90"  # 1000: nop
    b"\x90"  # 1001: nop
    b"\xfb"  # 1002: sti
    b"\x90"  # 1003: nop (in the sti shadow)
    b"\x90"  # 1004: nop
    b"\xf4"  # 1005: hlt
    b"\xf4"  # 1006: hlt
)
VMX_WINDOW = {
    # The first exit: (exit, rip, ready_for_interrupt_injection, if_flag). IF=0 at entry: the
    # window opens after the instruction in the sti shadow; IF=1 at entry: before anything ran.
    "if0_first": ("IRQ_WINDOW_OPEN", 0x1004, 1, 1),
    "if1_first": ("IRQ_WINDOW_OPEN", CODE_ADDR, 1, 1),
    # After injecting at that exit: the handler runs, irets, the main code runs on to a hlt.
    "if0_final_rip": 0x1006,
}
# PVM runs on to the HLT, unless the host reschedules its vCPU thread first: then the window
# exit comes wherever the guest was (after the sti shadow when IF was 0).
PVM_WINDOW = {
    "if0_first": OneOf(("HLT", 0x1006, 1, 1), ("IRQ_WINDOW_OPEN", 0x1004, 1, 1),
                       ("IRQ_WINDOW_OPEN", 0x1005, 1, 1)),
    "if1_first": OneOf(("HLT", 0x1006, 1, 1),
                       *(("IRQ_WINDOW_OPEN", rip, 1, 1) for rip in range(CODE_ADDR, 0x1006))),
    "if0_final_rip": OneOf(0x1007, 0x1006),
}  # fmt: skip


@scenario(
    documented={
        key: {"sim": VMX_WINDOW[key], "host": PVM_WINDOW[key] if host_is_pvm() else VMX_WINDOW[key]}
        for key in VMX_WINDOW
    }
)
def irq_window_open(k: Any) -> dict[str, Any]:
    """request_interrupt_window=1 with IF=0 and then `sti`, and with IF=1 from the start.

    Upstream VMX (the simulator): KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can take an
    interrupt (ready_for_interrupt_injection=1, if_flag=1). PVM seldom produces that exit: the
    guest usually runs on to HLT, which reports ready 1 / if_flag 1. Either way, a vector
    injected at that exit is delivered through the IVT and the guest resumes."""
    out: dict[str, Any] = {}
    for label, rflags in (("if0", 0x2), ("if1", 0x2 | IF)):
        with machine(k, WINDOW_CODE) as m:
            m.write(HANDLER_ADDR, handler("real", VECTOR))
            load_tables(m, "real", {VECTOR: HANDLER_ADDR})
            m.update_regs(rflags=rflags)
            m.runmap[0] = 1  # request_interrupt_window
            reason = m.run()
            header = m.header()
            out[f"{label}_first"] = (
                name(reason),
                m.regs().rip,
                header["ready_for_interrupt_injection"],
                header["if_flag"],
            )
            assert reason in (KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_HLT), name(reason)
            if label == "if1":
                continue
            m.runmap[0] = 0
            out["if0_inject"] = interrupt(m, VECTOR)
            for _ in range(MAX_RUNS):
                reason = m.run()
                if reason != KVM_EXIT_IO:
                    break
                out.setdefault("if0_handler", []).append(m.io()["data"])
            out["if0_final"] = name(reason)
            out["if0_final_rip"] = m.regs().rip
    assert out["if0_inject"] == 0
    assert out["if0_handler"] == [b"\x20"] and out["if0_final"] == "HLT"
    return out


@scenario
def hlt_while_the_window_is_requested(k: Any) -> dict[str, Any]:
    """IF=0 and request_interrupt_window=1: the window never opens, and the HLT still exits
    to userspace (with rip past it), not run through as the simulator once did."""
    code = b"\x90\x90\xf4\xe6\x10\xf4"  # nop; nop; hlt; out 0x10, al; hlt
    with machine(k, code) as m:
        m.update_regs(rflags=0x2)
        m.runmap[0] = 1  # request_interrupt_window
        reason = m.run()
        header = m.header()
        out = {"exit": name(reason), "rip": m.regs().rip, "if_flag": header["if_flag"]}
    assert out == {"exit": "HLT", "rip": CODE_ADDR + 3, "if_flag": 0}
    return out


@scenario
def nmi_ignores_if(k: Any) -> dict[str, Any]:
    """KVM_NMI returns 0 and the NMI is delivered through vector 2 even with IF=0, in real mode
    (IVT), 32-bit (interrupt gate) and 64-bit mode; frames as for an interrupt."""
    out: dict[str, Any] = {}
    for mode in ("real", "prot32", "long64"):
        with machine(k, MAIN, mode) as m:
            m.write(HANDLER_ADDR, handler(mode, NMI))
            load_tables(m, mode, {NMI: HANDLER_ADDR})
            result = try_ioctl(k, m.vcpu_fd, KVM_NMI, 0)
            out[mode] = {"nmi": result, **run_through_handler(m, mode)}
    assert out["real"] == {
        "nmi": 0,
        "vector": b"\x02",
        "frame": (CODE_ADDR, 0, 0x2),
        "then": ("HLT", 0x1003, 0x2, STACK_TOP),
    }
    assert out["prot32"] == {
        "nmi": 0,
        "vector": b"\x02",
        "frame": (CODE_ADDR, 0x08, 0x2),
        "then": ("HLT", HANDLER_ADDR + 5, 0x2, STACK_TOP - 12),
    }
    assert out["long64"] == {
        "nmi": 0,
        "vector": b"\x02",
        "frame": (CODE_ADDR, 0x08, 0x2, STACK_TOP, 0x10),
        "then": ("HLT", 0x1003, 0x2, STACK_TOP),
    }
    return out
