"""Scenarios for the in-kernel local APIC (KVM_CREATE_IRQCHIP): its reset state and
KVM_GET/SET_LAPIC, the guest's xAPIC page, the timer, IPIs (INIT/SIPI start-up of 2 and 4
vCPUs, fixed IPIs), x2APIC MSRs, the IOAPIC's MMIO window with a routed line, GSI routing
and MSIs.

The guests run in real mode with FS based at the APIC page (0xfee00000) and GS at the
IOAPIC's (0xfec00000), so `mov dword ptr fs:[0xf0], eax` is a store to the APIC's SPIV.
Handlers report with `out 0x10, al`; with the irqchip in the kernel HLT never exits, so
every scenario ends at an OUT (or a signal bounds the wait).
"""

from __future__ import annotations

import ctypes
import signal
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvmlab.asm import assemble
from kvmlab.uapi import (
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_IO,
    KVM_EXIT_SET_TPR,
    KVM_GET_LAPIC,
    KVM_GET_SUPPORTED_CPUID,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_MP_STATE_RUNNABLE,
    KVM_SET_CPUID2,
    KVM_SET_GSI_ROUTING,
    KVM_SET_LAPIC,
    KVM_SIGNAL_MSI,
    flex,
    kvm_cpuid2,
    kvm_irq_routing,
    kvm_lapic_state,
    kvm_msi,
    kvm_regs,
)

from .guest import (
    MEM_SIZE,
    STACK_TOP,
    Fds,
    Machine,
    set_region,
    try_ioctl,
)
from .registry import host_is_pvm, scenario
from .scenarios_irqchip import chip_machine, ioapic, line_status, mp_state, name, set_mp_state

APIC_BASE = 0xFEE00000
IOAPIC_BASE = 0xFEC00000
CODE = 0x1000
RESULTS = 0x3000  # the guests store what they read here
HANDLERS = 0x4000
REG_NAMES = {
    0x20: "ID", 0x30: "LVR", 0x80: "TPR", 0xA0: "PPR", 0xD0: "LDR", 0xE0: "DFR", 0xF0: "SPIV",
    0x280: "ESR", 0x300: "ICR", 0x310: "ICR2", 0x320: "LVTT", 0x330: "LVTTHMR", 0x340: "LVTPC",
    0x350: "LVT0", 0x360: "LVT1", 0x370: "LVTERR", 0x380: "TMICT", 0x390: "TMCCT", 0x3E0: "TDCR",
}  # fmt: skip


def asm(source: str, base: int) -> bytes:
    return assemble(source, mode="16", base=base).code


def lapic_page(k: Any, vcpu_fd: int) -> bytes | str:
    buf = bytearray(ctypes.sizeof(kvm_lapic_state))
    r = try_ioctl(k, vcpu_fd, KVM_GET_LAPIC, buf)
    return r if isinstance(r, str) else bytes(buf)


def regs_of(page: bytes, *, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """The named registers of a KVM_GET_LAPIC page, plus every nonzero ISR/TMR/IRR word."""
    out = {n: struct.unpack_from("<I", page, off)[0] for off, n in REG_NAMES.items()}
    for base, kind in ((0x100, "ISR"), (0x180, "TMR"), (0x200, "IRR")):
        for i in range(8):
            word = struct.unpack_from("<I", page, base + 0x10 * i)[0]
            if word:
                out[f"{kind}{i}"] = word
    return {n: v for n, v in out.items() if n not in skip}


@contextmanager
def apic_vm(k: Any, vcpus: int = 1, *, cpuid: bool = False) -> Iterator[list[Machine]]:
    """A VM with the irqchip in the kernel, RAM at 0 and `vcpus` vCPUs; vCPU 0 starts at
    CODE in real mode with FS at the APIC page and GS at the IOAPIC window."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        mem, hva = fds.ram(MEM_SIZE)
        r = set_region(k, vm_fd, 0, 0, MEM_SIZE, hva)
        assert r == 0, r
        machines = []
        for i in range(vcpus):
            m = Machine(k, fds, sys_fd, vm_fd, fds.create_vcpu(vm_fd, i))
            m.mem, m.hva = mem, hva
            m.runmap = fds.map_run(sys_fd, m.vcpu_fd)
            if cpuid:
                set_supported_cpuid(k, sys_fd, m.vcpu_fd)
            machines.append(m)
        bsp = machines[0]
        sregs = bsp.sregs()
        sregs.cs.selector = sregs.cs.base = 0
        sregs.fs.base, sregs.gs.base = APIC_BASE, IOAPIC_BASE
        bsp.set_sregs(sregs)
        bsp.set_regs(kvm_regs(rip=CODE, rsp=STACK_TOP, rflags=0x2))
        yield machines


def set_supported_cpuid(k: Any, sys_fd: int, vcpu_fd: int) -> None:
    table = flex(kvm_cpuid2, 100)(nent=100)
    buf = bytearray(bytes(table))
    k.ioctl(sys_fd, KVM_GET_SUPPORTED_CPUID, buf)
    k.ioctl(vcpu_fd, KVM_SET_CPUID2, buf)


def set_vector(m: Machine, vector: int, handler: int) -> None:
    m.mem[vector * 4 : vector * 4 + 4] = handler.to_bytes(2, "little") + b"\x00\x00"


def run_to_io(m: Machine, *, limit: float = 5.0) -> tuple[str, int, int] | str:
    """KVM_RUN to the next exit, from the main thread (a SIGALRM after `limit` seconds bounds
    a guest that sleeps): the exit with its port and data, or the errno name."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return exit_of(m, m.try_run())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def in_threads(jobs: list[Any], *, limit: float = 5.0) -> None:
    """Run each job on its own thread; one still in KVM_RUN after `limit` seconds gets a
    SIGALRM (its KVM_RUN then fails with EINTR)."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    threads = [threading.Thread(target=job) for job in jobs]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + limit
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0))
            while t.is_alive() and t.ident is not None:
                signal.pthread_kill(t.ident, signal.SIGALRM)
                t.join(0.1)
    finally:
        signal.signal(signal.SIGALRM, previous)


def exit_of(m: Machine, r: int | str) -> tuple[str, int, int] | str:
    if isinstance(r, str):
        return r
    io = m.io()
    data = int.from_bytes(io["data"], "little") if r == KVM_EXIT_IO else 0
    return (name(r), io["port"] if r == KVM_EXIT_IO else 0, data)


def results(m: Machine, n: int) -> list[int]:
    return [m.u32(RESULTS + 4 * i) for i in range(n)]


@scenario
def lapic_reset_state_and_get_set(k: Any) -> dict[str, Any]:
    """KVM_GET_LAPIC: EINVAL without the irqchip; the BSP's and an AP's reset registers (ID
    in bits 31:24, version 0x50014, SPIV 0xff, LVTs masked, the BSP's LVT0 ExtINT, flat DFR).
    KVM_SET_LAPIC takes a page and KVM_GET_LAPIC gives it back with PPR recomputed."""
    out: dict[str, Any] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        plain = fds.create_vm(sys_fd)
        out["no_irqchip"] = lapic_page(k, fds.create_vcpu(plain, 0))
        out["set_no_irqchip"] = try_ioctl(k, fds.create_vcpu(plain, 1), KVM_SET_LAPIC, bytes(0x400))
        vm = fds.create_vm(sys_fd)
        k.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        bsp, ap = fds.create_vcpu(vm, 0), fds.create_vcpu(vm, 3)
        for label, fd in (("bsp", bsp), ("ap3", ap)):
            page = lapic_page(k, fd)
            assert isinstance(page, bytes)
            out[label] = regs_of(page)
        page = bytearray(lapic_page(k, ap))  # type: ignore[arg-type]
        for off, value in (
            (0x80, 0x20),  # TPR
            (0xF0, 0x1FF),  # SPIV: enabled
            (0xD0, 0x04000000),  # LDR
            (0x350, 0x8700),  # LVT0
            (0x110, 1 << 3),  # ISR: vector 0x23
            (0x210, 1 << 5),  # IRR: vector 0x25
            (0x3E0, 0xB),  # TDCR
        ):
            struct.pack_into("<I", page, off, value)
        out["set"] = try_ioctl(k, ap, KVM_SET_LAPIC, bytes(page))
        back = lapic_page(k, ap)
        assert isinstance(back, bytes)
        out["after_set"] = regs_of(back)
    assert out["no_irqchip"] == "EINVAL"
    assert out["bsp"]["LVR"] == 0x50014 and out["ap3"]["ID"] == 3 << 24
    return out


XAPIC_PROBE = """
    mov ebx, 0x3000
    mov eax, dword ptr fs:[0x20]    ; ID
    mov [bx], eax
    mov eax, dword ptr fs:[0x30]    ; version
    mov [bx+4], eax
    mov al, byte ptr fs:[0x32]      ; one byte of it
    movzx eax, al
    mov [bx+8], eax
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax    ; SPIV: software-enable, spurious vector 0xff
    mov eax, 0x30
    mov dword ptr fs:[0x80], eax    ; TPR 0x30
    mov eax, dword ptr fs:[0xa0]    ; PPR follows
    mov [bx+12], eax
    mov eax, 0xffffffff
    mov dword ptr fs:[0x360], eax   ; LVT1: only the writable bits stay
    mov eax, dword ptr fs:[0x360]
    mov [bx+16], eax
    mov eax, 0x12345678
    mov dword ptr fs:[0x30], eax    ; version is read-only
    mov eax, dword ptr fs:[0x30]
    mov [bx+20], eax
    mov eax, 0x05000000
    mov dword ptr fs:[0x20], eax    ; a new xAPIC ID
    mov eax, dword ptr fs:[0x20]
    mov [bx+24], eax
    mov eax, 0x0f000000
    mov dword ptr fs:[0xe0], eax    ; DFR: cluster model (the low bits read as ones)
    mov eax, dword ptr fs:[0xe0]
    mov [bx+28], eax
    mov eax, dword ptr fs:[0x290]   ; a register that cannot be read: 0
    mov [bx+32], eax
    mov eax, 0
    mov dword ptr fs:[0xf0], eax    ; software-disable: every LVT gets masked
    mov eax, dword ptr fs:[0x350]
    mov [bx+36], eax
    mov ax, 0x1234
    mov word ptr fs:[0x80], ax      ; a 16-bit store is not a register write
    mov eax, dword ptr fs:[0x80]
    mov [bx+40], eax
    out 0x10, al
"""


@scenario
def xapic_page_from_the_guest(k: Any) -> dict[str, Any]:
    """The guest's loads and stores to the APIC page never exit: ID, version (and one byte of
    it), PPR following TPR, LVT write masks, read-only version, a new ID, DFR's fixed bits,
    software-disable masking LVT0, a 16-bit store ignored.
    Finally KVM_GET_LAPIC sees what the guest did."""
    with apic_vm(k) as (m,):
        m.write(CODE, asm(XAPIC_PROBE, CODE))
        exit_ = run_to_io(m)
        page = lapic_page(k, m.vcpu_fd)
        assert isinstance(page, bytes)
        out = {
            "exit": exit_,
            "guest_saw": results(m, 11),
            "lapic": regs_of(page),
            "mmio_exits": m.kvm_run().exit_reason,
        }
    assert exit_ == ("IO", 0x10, out["guest_saw"][10] & 0xFF)
    assert out["guest_saw"][1] == 0x50014 and out["guest_saw"][3] == 0x30
    return out


TIMER_GUEST = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax    ; software-enable the APIC
    mov eax, 0xb
    mov dword ptr fs:[0x3e0], eax   ; divide by 1
    mov eax, {lvtt:#x}
    mov dword ptr fs:[0x320], eax   ; LVTT: mode and vector 0x40
    mov eax, {count}
    mov dword ptr fs:[0x380], eax   ; TMICT: start
    sti
idle:
    hlt
    jmp idle
"""
TIMER_HANDLER = """
    inc dword ptr [0x3000]
    mov eax, dword ptr [0x3000]
    out 0x10, al
    xor eax, eax
    mov dword ptr fs:[0xb0], eax    ; EOI
    iret
"""


# VMX sets the vector's ISR bit when it injects the interrupt, so KVM_GET_LAPIC shows it in
# service while the handler runs; PVM's page shows nothing in service there.
def in_service(n: int) -> dict[str, list[int]]:
    return {"sim": [1] * n, "host": [0] * n if host_is_pvm() else [1] * n}


@scenario(documented={"periodic_isr": in_service(4), "oneshot_isr": in_service(1)})
def lapic_timer_periodic_counted_by_guest(k: Any) -> dict[str, Any]:
    """A periodic LAPIC timer (2 ms): the guest sleeps in HLT (no exits) and its handler counts
    ticks, reporting each with an OUT; while it runs TMCCT is below TMICT; the vector is in
    service (ISR) at each report. Then one-shot: one tick, and the next wait sleeps until a
    signal (EINTR). Before KVM_SET_CPUID2 the LVTT timer-mode bits cannot be set at all."""
    out: dict[str, Any] = {}
    with apic_vm(k) as (m,):
        lvtt_only = (
            "mov eax, 0x1ff\nmov dword ptr fs:[0xf0], eax\n"
            "mov eax, 0x20040\nmov dword ptr fs:[0x320], eax\nout 0x10, al"
        )
        m.write(CODE, asm(lvtt_only, CODE))
        run_to_io(m)
        out["lvtt_without_cpuid"] = regs_of(lapic_page(k, m.vcpu_fd))["LVTT"]  # type: ignore[arg-type]
    for mode, lvtt in (("periodic", 0x20040), ("oneshot", 0x40)):
        with apic_vm(k, cpuid=True) as (m,):
            m.write(CODE, asm(TIMER_GUEST.format(lvtt=lvtt, count=2_000_000), CODE))
            m.write(HANDLERS, asm(TIMER_HANDLER, HANDLERS))
            set_vector(m, 0x40, HANDLERS)
            ticks, isr = [], []
            start = time.monotonic()
            for _ in range(4 if mode == "periodic" else 1):
                ticks.append(run_to_io(m))
                page = lapic_page(k, m.vcpu_fd)
                assert isinstance(page, bytes)
                regs = regs_of(page)
                isr.append(regs.get("ISR2", 0))
                tmcct_ok = 0 < regs["TMCCT"] <= 2_000_000 if mode == "periodic" else True
            elapsed = time.monotonic() - start
            out[mode] = {"ticks": ticks, "tmcct_in_range": tmcct_ok}
            out[f"{mode}_isr"] = isr
            if mode == "oneshot":
                out[mode]["after"] = run_to_io(m, limit=0.1)
                out[mode]["tmcct"] = regs_of(lapic_page(k, m.vcpu_fd))["TMCCT"]  # type: ignore[arg-type]
            assert elapsed >= 0.0015 * len(ticks), elapsed
    assert out["periodic"]["ticks"] == [("IO", 0x10, n) for n in (1, 2, 3, 4)]
    assert out["oneshot"]["after"] == "EINTR" and out["lvtt_without_cpuid"] == 0x40
    return out


SIPI_BSP = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax    ; software-enable the APIC
    mov eax, 0
    mov dword ptr fs:[0x310], eax   ; ICR2: no destination (a shorthand is used)
    mov eax, 0xc4500
    mov dword ptr fs:[0x300], eax   ; INIT, assert, to all but self
    mov eax, 0xc4602
    mov dword ptr fs:[0x300], eax   ; SIPI, vector 2: the APs start at 0x2000
wait:
    pause
    cmp word ptr [0x3000], {aps}
    jne wait
    mov eax, dword ptr fs:[0x300]   ; the ICR reads back
    mov [0x3004], eax
    mov ax, [0x3000]
    out 0x10, al
"""
SIPI_AP = """
    mov ax, 1
    lock xadd word ptr [0x3000], ax
    inc ax
    out 0x11, al                    ; report the ticket: 1, 2, 3
"""


def ap_run(ap: Machine, runs: list[Any]) -> None:
    """KVM_RUN an AP until it exits for something other than EAGAIN (at most 4 times)."""
    for _ in range(4):
        r = ap.try_run()
        runs.append(r if isinstance(r, str) else name(r))
        if r != "EAGAIN":
            return


@scenario
def smp_startup_with_init_sipi(k: Any) -> dict[str, Any]:
    """INIT and SIPI from the BSP's ICR start 1 and 3 APs: each AP's KVM_RUN waits (the first
    returns EAGAIN once it has taken INIT), then it runs in real mode at the SIPI vector's page
    (CS 0x200, IP 0) and counts itself in; the BSP sees them all."""
    out: dict[str, Any] = {}
    for n in (2, 4):
        with apic_vm(k, n) as machines:
            bsp, aps = machines[0], machines[1:]
            bsp.write(CODE, asm(SIPI_BSP.format(aps=n - 1), CODE))
            bsp.write(0x2000, asm(SIPI_AP, 0))
            before = [mp_state(ap) for ap in aps]
            ap_runs: dict[int, list[Any]] = {ap.vcpu_fd: [] for ap in aps}
            bsp_exit: list[Any] = []
            jobs = [lambda bsp=bsp, out=bsp_exit: out.append(exit_of(bsp, bsp.try_run()))]
            jobs += [lambda ap=ap, runs=ap_runs: ap_run(ap, runs[ap.vcpu_fd]) for ap in aps]
            in_threads(jobs)
            ap_state = []
            for ap in aps:
                sregs = ap.sregs()
                ap_state.append(
                    {
                        "runs": ap_runs[ap.vcpu_fd],
                        "io": (ap.io()["port"], ap.io()["data"][0]),
                        "cs": (sregs.cs.selector, sregs.cs.base),
                        "mp_state": mp_state(ap),
                    }
                )
            out[f"{n}_vcpus"] = {
                "mp_state_before": before,
                "bsp": bsp_exit[0],
                "icr_read": bsp.u32(0x3004),
                "aps": sorted(ap_state, key=lambda a: a["io"]),
            }
    two = out["2_vcpus"]
    assert two["bsp"] == ("IO", 0x10, 1) and two["mp_state_before"] == [1]
    assert two["aps"][0]["runs"] == ["EAGAIN", "IO"] and two["aps"][0]["cs"] == (0x200, 0x2000)
    assert [a["io"] for a in out["4_vcpus"]["aps"]] == [(0x11, 1), (0x11, 2), (0x11, 3)]
    return out


IPI_GUEST = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax
    mov eax, 0x01000000
    mov dword ptr fs:[0x310], eax   ; ICR2: APIC 1
    mov eax, 0x4061
    mov dword ptr fs:[0x300], eax   ; fixed IPI, vector 0x61, physical destination 1
    mov eax, 0x44062
    mov dword ptr fs:[0x300], eax   ; fixed IPI to self (shorthand): vector 0x62
    sti
idle:
    hlt
    jmp idle
"""
IPI_HANDLER = """
    mov al, {vector:#x}
    out 0x10, al
    xor eax, eax
    mov dword ptr fs:[0xb0], eax
    iret
"""
AP_IDLE = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax
    out 0x12, al                    ; ready
    sti
idle:
    hlt
    jmp idle
"""


@scenario
def fixed_ipi_between_vcpus(k: Any) -> dict[str, Any]:
    """A fixed IPI by physical destination wakes vCPU 1 from HLT into its handler; a self-IPI
    (shorthand) runs the sender's own handler. vCPU 1 is made runnable in real mode directly
    (KVM_SET_MP_STATE RUNNABLE), with its APIC enabled by its own code."""
    with apic_vm(k, 2) as (bsp, ap):
        bsp.write(CODE, asm(IPI_GUEST, CODE))
        for vector, addr in ((0x61, HANDLERS), (0x62, HANDLERS + 0x100)):
            bsp.write(addr, asm(IPI_HANDLER.format(vector=vector), addr))
            set_vector(bsp, vector, addr)
        bsp.write(0x5000, asm(AP_IDLE, 0x5000))
        set_mp_state(ap, KVM_MP_STATE_RUNNABLE)
        sregs = ap.sregs()
        sregs.cs.selector = sregs.cs.base = 0
        sregs.fs.base = APIC_BASE
        ap.set_sregs(sregs)
        ap.set_regs(kvm_regs(rip=0x5000, rsp=0xE000, rflags=0x2))
        ready = run_to_io(ap)
        got: list[Any] = []
        sent: list[Any] = []

        def send() -> None:
            time.sleep(0.05)  # vCPU 1 is asleep in HLT by now (or wakes at once: same result)
            sent.append(exit_of(bsp, bsp.try_run()))

        in_threads([lambda: got.append(exit_of(ap, ap.try_run())), send])
        out = {"ap_ready": ready, "ap_took": got, "bsp_took": sent}
    assert out["ap_took"] == [("IO", 0x10, 0x61)] and sent == [("IO", 0x10, 0x62)]
    return out


X2APIC_GUEST = """
    mov ecx, 0x1b
    rdmsr
    or eax, 0xc00                   ; enable + x2APIC mode
    wrmsr
    mov ebx, 0x3000
    mov ecx, 0x802                  ; ID
    rdmsr
    mov [bx], eax
    mov ecx, 0x803                  ; version
    rdmsr
    mov [bx+4], eax
    mov ecx, 0x80d                  ; LDR, fixed by the ID
    rdmsr
    mov [bx+8], eax
    mov ecx, 0x80f
    mov eax, 0x1ff
    xor edx, edx
    wrmsr                           ; SPIV
    mov eax, dword ptr fs:[0x30]    ; the xAPIC page now reads as all ones
    mov [bx+12], eax
    sti
    mov ecx, 0x83f
    mov eax, 0x63
    wrmsr                           ; SELF IPI, vector 0x63
    nop
    mov al, 0x99
    out 0x11, al
"""
X2APIC_HANDLER = """
    mov al, 0x63
    out 0x10, al
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr                           ; EOI
    iret
"""


# VMX takes the WRMSR to SELF_IPI, accepts the IPI and injects it at the re-entry, so the
# handler runs before the next instructions; PVM delivers it only at the next exit.
SELF_IPI_ORDER = {
    "sim": [("IO", 0x10, 0x63), ("IO", 0x11, 0x99)],
    "host": [("IO", 0x11, 0x99), ("IO", 0x10, 0x63)]
    if host_is_pvm()
    else [("IO", 0x10, 0x63), ("IO", 0x11, 0x99)],
}


@scenario(documented={"exits": SELF_IPI_ORDER})
def x2apic_msrs(k: Any) -> dict[str, Any]:
    """With x2APIC in the guest's CPUID, the guest switches its APIC to x2APIC mode and uses the
    MSRs: ID (the vCPU id), version, the derived LDR, SPIV, a SELF IPI and the EOI MSR; the
    xAPIC page reads as all ones. KVM_GET_LAPIC still shows the ID in xAPIC form."""
    with apic_vm(k, cpuid=True) as (m,):
        m.write(CODE, asm(X2APIC_GUEST, CODE))
        m.write(HANDLERS, asm(X2APIC_HANDLER, HANDLERS))
        set_vector(m, 0x63, HANDLERS)
        exits = [run_to_io(m), run_to_io(m)]
        page = lapic_page(k, m.vcpu_fd)
        assert isinstance(page, bytes)
        out = {
            "exits": exits,
            "guest_saw": results(m, 4),
            "apic_base": m.sregs().apic_base,
            "lapic": regs_of(page, skip=("TMCCT",)),
        }
    assert sorted(exits) == [("IO", 0x10, 0x63), ("IO", 0x11, 0x99)]
    assert out["guest_saw"][:3] == [0, 0x50014, 1] and out["apic_base"] & 0xC00 == 0xC00
    return out


IOAPIC_GUEST = """
    mov al, 0xff
    out 0x21, al                    ; mask the PICs: GSI 5 reaches their pin 5 too
    out 0xa1, al
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax
    mov ebx, 0x3000
    mov eax, 1
    mov dword ptr gs:[0], eax       ; IOREGSEL: version
    mov eax, dword ptr gs:[0x10]
    mov [bx], eax
    mov eax, 0x1b
    mov dword ptr gs:[0], eax       ; pin 5, high half
    xor eax, eax
    mov dword ptr gs:[0x10], eax    ; destination APIC 0
    mov eax, 0x1a
    mov dword ptr gs:[0], eax       ; pin 5, low half
    mov eax, 0xc045                 ; vector 0x45, level (the remote IRR bit is read-only)
    mov dword ptr gs:[0x10], eax
    mov eax, dword ptr gs:[0x10]
    mov [bx+4], eax
    out 0x12, al                    ; programmed
    sti
idle:
    hlt
    jmp idle
"""
IOAPIC_HANDLER = """
    out 0x10, al                    ; in service, before the EOI
    xor eax, eax
    mov dword ptr fs:[0xb0], eax    ; EOI: the IOAPIC clears remote IRR
    out 0x11, al
    iret
"""


# After the line is lowered, the interrupt the last EOI re-delivered still runs its handler.
# On VMX (and in kvm_ioapic_update_eoi) its remote IRR stays set until that handler's EOI;
# PVM's IOAPIC shows it already clear there.
LINE_LOW = [(("IO", 0x10, 0), 1), (("IO", 0x11, 0), 0), ("EINTR", 0)]
LINE_LOW_PVM = [(("IO", 0x10, 0), 0), (("IO", 0x11, 0), 0), ("EINTR", 0)]


@scenario(
    documented={"line_low": {"sim": LINE_LOW, "host": LINE_LOW_PVM if host_is_pvm() else LINE_LOW}}
)
def ioapic_mmio_and_routed_level_line(k: Any) -> dict[str, Any]:
    """The guest masks the PICs and programs the IOAPIC through IOREGSEL/IOWIN (version
    0x170011; pin 5 level-triggered to vector 0x45, APIC 0). KVM_IRQ_LINE 5 high is delivered;
    remote IRR holds while the handler runs; its EOI clears it and, the line still high,
    delivers the interrupt again (remote IRR set again); once lowered, the interrupt already
    in the APIC still runs, and its EOI ends it."""
    with apic_vm(k) as (m,):
        m.write(CODE, asm(IOAPIC_GUEST, CODE))
        m.write(HANDLERS, asm(IOAPIC_HANDLER, HANDLERS))
        set_vector(m, 0x45, HANDLERS)

        def remote_irr() -> int:
            return int(ioapic(k, m.vm_fd)["redirtbl"][5] >> 14 & 1)

        out: dict[str, Any] = {"programmed": run_to_io(m)}
        out["status"] = line_status(k, m.vm_fd, 5, 1)
        steps = []
        for _ in range(4):  # in the handler, after its EOI, in it again, after the EOI
            steps.append((run_to_io(m), remote_irr()))
        out["line_high"] = steps
        out["lowered"] = line_status(k, m.vm_fd, 5, 0)
        out["line_low"] = [(run_to_io(m, limit=0.2), remote_irr()) for _ in range(3)]
        out["guest_saw"] = [hex(v) for v in results(m, 2)]
    assert out["guest_saw"] == ["0x170011", "0x8045"]  # remote IRR was not written
    assert [step[1] for step in steps] == [1, 1, 1, 1], steps
    assert out["line_low"][-1] == ("EINTR", 0), out
    return out


def routing(entries: list[tuple[int, int, tuple[int, ...]]], flags: int = 0) -> bytes:
    """A kvm_irq_routing with (gsi, type, (chip, pin) or (address, data)) entries."""
    table = flex(kvm_irq_routing, len(entries))(nr=len(entries), flags=flags)
    for i, (gsi, type_, args) in enumerate(entries):
        e = table.entries[i]
        e.gsi, e.type = gsi, type_
        if type_ == KVM_IRQ_ROUTING_IRQCHIP:
            e.u.irqchip.irqchip, e.u.irqchip.pin = args
        else:
            e.u.msi.address_lo, e.u.msi.data = args
    return bytes(table)


MSI_GUEST = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax
    out 0x12, al
    sti
idle:
    hlt
    jmp idle
"""


@scenario
def gsi_routing_and_msi(k: Any) -> dict[str, Any]:
    """KVM_SET_GSI_ROUTING's checks (no irqchip, flags, a pin the chip lacks, a chip twice
    for one GSI, an MSI sharing a GSI, a GSI too large) and a table with an MSI route:
    KVM_IRQ_LINE on that GSI and KVM_SIGNAL_MSI deliver the MSI's vector to the guest, whose
    APIC is enabled; an MSI to nobody; GSI 0's routes gone from the new table."""
    out: dict[str, Any] = {}
    msi = (APIC_BASE, 0x55)
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        plain = fds.create_vm(sys_fd)
        out["no_irqchip"] = try_ioctl(k, plain, KVM_SET_GSI_ROUTING, routing([]))
        msi_req = bytes(kvm_msi(address_lo=APIC_BASE, data=0x55))
        out["signal_no_irqchip"] = try_ioctl(k, plain, KVM_SIGNAL_MSI, msi_req)
    checks = {
        "flags": routing([], flags=1),
        "pic_pin_8": routing([(1, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_PIC_MASTER, 8))]),
        "ioapic_pin_24": routing([(1, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_IOAPIC, 24))]),
        "chip_3": routing([(1, KVM_IRQ_ROUTING_IRQCHIP, (3, 0))]),
        "same_chip_twice": routing(
            [
                (1, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_IOAPIC, 1)),
                (1, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_IOAPIC, 2)),
            ]
        ),
        "msi_and_pin": routing(
            [(1, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_IOAPIC, 1)), (1, KVM_IRQ_ROUTING_MSI, msi)]
        ),
        "gsi_4096": routing([(4096, KVM_IRQ_ROUTING_MSI, msi)]),
        "bad_type": routing([(1, 9, (0, 0))]),
    }
    with apic_vm(k) as (m,):
        out["checks"] = {
            label: try_ioctl(k, m.vm_fd, KVM_SET_GSI_ROUTING, t) for label, t in checks.items()
        }
        good = routing(
            [
                (30, KVM_IRQ_ROUTING_MSI, msi),
                (4, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_PIC_MASTER, 4)),
                (4, KVM_IRQ_ROUTING_IRQCHIP, (KVM_IRQCHIP_IOAPIC, 4)),
            ]
        )
        out["set"] = try_ioctl(k, m.vm_fd, KVM_SET_GSI_ROUTING, good)
        out["gsi0_unrouted"] = line_status(k, m.vm_fd, 0, 1)
        out["msi_before_enable"] = try_ioctl(
            k, m.vm_fd, KVM_SIGNAL_MSI, bytes(kvm_msi(address_lo=APIC_BASE, data=0x55))
        )
        m.write(CODE, asm(MSI_GUEST, CODE))
        m.write(HANDLERS, asm(IPI_HANDLER.format(vector=0x55), HANDLERS))
        set_vector(m, 0x55, HANDLERS)
        out["ready"] = run_to_io(m)
        out["line_msi"] = (line_status(k, m.vm_fd, 30, 1), run_to_io(m))
        line_status(k, m.vm_fd, 30, 0)
        out["signal_msi"] = (
            try_ioctl(k, m.vm_fd, KVM_SIGNAL_MSI, bytes(kvm_msi(address_lo=APIC_BASE, data=0x55))),
            run_to_io(m),
        )
        to_nobody = bytes(kvm_msi(address_lo=APIC_BASE | (7 << 12), data=0x55))
        out["msi_to_nobody"] = try_ioctl(k, m.vm_fd, KVM_SIGNAL_MSI, to_nobody)
        out["bad_flags"] = try_ioctl(k, m.vm_fd, KVM_SIGNAL_MSI, bytes(kvm_msi(flags=2)))
    assert out["set"] == 0 and out["line_msi"][1] == ("IO", 0x10, 0x55)
    return out


TSC_DEADLINE_GUEST = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax
    mov ecx, 0x6e0
    xor eax, eax
    mov edx, 1
    wrmsr                           ; a deadline, but LVTT is not in TSC-deadline mode: ignored
    rdmsr
    mov [0x3004], eax
    mov [0x3008], edx
    mov eax, 0x40040
    mov dword ptr fs:[0x320], eax   ; LVTT: TSC-deadline mode, vector 0x40
    rdtsc
    add eax, 2000000                ; about a millisecond from now
    adc edx, 0
    mov ecx, 0x6e0
    wrmsr
    rdmsr                           ; armed: reads back
    sub eax, [0x3010]
    mov [0x300c], eax
    sti
idle:
    hlt
    jmp idle
"""
TSC_DEADLINE_HANDLER = """
    mov ecx, 0x6e0
    rdmsr                           ; fired: the deadline reads 0 again
    mov [0x3000], eax
    mov [0x3010], edx
    out 0x10, al
    xor eax, eax
    mov dword ptr fs:[0xb0], eax
    iret
"""


@scenario
def lapic_tsc_deadline_timer(k: Any) -> dict[str, Any]:
    """TSC-deadline mode (offered by CPUID): MSR 0x6e0 is ignored in another timer mode;
    armed, it fires the LVTT vector once the guest's TSC passes it and then reads 0; the
    guest sleeps in HLT meanwhile. A second HLT sleeps until a signal."""
    with apic_vm(k, cpuid=True) as (m,):
        m.write(CODE, asm(TSC_DEADLINE_GUEST, CODE))
        m.write(HANDLERS, asm(TSC_DEADLINE_HANDLER, HANDLERS))
        set_vector(m, 0x40, HANDLERS)
        fired = run_to_io(m)
        out = {
            "fired": fired,
            "msr_after": (m.u32(RESULTS), m.u32(RESULTS + 0x10)),
            "ignored_write": (m.u32(RESULTS + 4), m.u32(RESULTS + 8)),
            "then": run_to_io(m, limit=0.1),
        }
    assert out["fired"] == ("IO", 0x10, 0) and out["then"] == "EINTR", out
    return out


NMI_IPI_GUEST = """
    mov eax, 0x1ff
    mov dword ptr fs:[0xf0], eax
    mov eax, 0x44400
    mov dword ptr fs:[0x300], eax   ; an NMI to self (the vector field is ignored)
    nop
    mov al, 0x99
    out 0x11, al
"""
NMI_HANDLER = """
    mov al, 2
    out 0x10, al
    iret
"""


NMI_ORDER = {
    "sim": [("IO", 0x10, 2), ("IO", 0x11, 0x99)],
    "host": [("IO", 0x11, 0x99), ("IO", 0x10, 2)]
    if host_is_pvm()
    else [("IO", 0x10, 2), ("IO", 0x11, 0x99)],
}


@scenario(documented={"exits": NMI_ORDER})
def nmi_ipi_to_self(k: Any) -> dict[str, Any]:
    """An NMI sent through the ICR is taken through vector 2 even with IF clear. On VMX the
    APIC write exits, and the NMI is injected at the re-entry, before the next instruction;
    PVM (like a self-IPI through x2APIC) delivers it only at the next exit."""
    with apic_vm(k) as (m,):
        m.write(CODE, asm(NMI_IPI_GUEST, CODE))
        m.write(HANDLERS, asm(NMI_HANDLER, HANDLERS))
        set_vector(m, 2, HANDLERS)
        out = {"exits": [run_to_io(m), run_to_io(m)]}
    assert sorted(out["exits"]) == [("IO", 0x10, 2), ("IO", 0x11, 0x99)], out
    return out


CR8_GUEST = """
    mov rax, 5
    mov cr8, rax                    ; raise the task priority
    mov rbx, cr8
    mov rax, 2
    mov cr8, rax                    ; lower it
    mov rcx, cr8
    mov al, 0x77
    out 0x10, al
    mov rax, 16
    mov cr8, rax                    ; a reserved bit: #GP (no IDT: a triple fault)
"""


# VMX exits for CR8 writes when the APIC is not in the kernel, and lowering CR8 is a
# KVM_EXIT_SET_TPR (userspace may have an interrupt to inject now); PVM never exits for it.
SET_TPR_EXITS = {
    "sim": ["SET_TPR", "IO", "SHUTDOWN"],
    "host": ["IO", "SHUTDOWN"] if host_is_pvm() else ["SET_TPR", "IO", "SHUTDOWN"],
}


@scenario(documented={"no_irqchip_exits": SET_TPR_EXITS})
def cr8_is_the_task_priority(k: Any) -> dict[str, Any]:
    """MOV to and from CR8 in a 64-bit guest. Without the irqchip it is KVM's cr8, which
    kvm_run.cr8 and KVM_GET_SREGS report; lowering it exits to userspace (SET_TPR, on VMX).
    With the irqchip it is the local APIC's TPR (bits 7:4), as KVM_GET_LAPIC shows, and
    KVM_SET_SREGS's cr8 lands there too. A reserved bit is #GP."""
    code = assemble(CR8_GUEST, mode="64", base=CODE).code
    out: dict[str, Any] = {}
    for irqchip in (False, True):
        label = "irqchip" if irqchip else "no_irqchip"
        with chip_machine(k, code, irqchip=irqchip, mode="long64") as m:
            exits, seen = [], None
            for _ in range(4):
                r = m.try_run()
                exits.append(r if isinstance(r, str) else name(r))
                if r == KVM_EXIT_IO:
                    regs = m.regs()
                    seen = (regs.rbx, regs.rcx, m.kvm_run().cr8, m.sregs().cr8)
                if r not in (KVM_EXIT_IO, KVM_EXIT_SET_TPR):
                    break
            out[f"{label}_exits"] = exits
            out[f"{label}_seen"] = seen
            if irqchip:
                out["tpr"] = regs_of(lapic_page(k, m.vcpu_fd))["TPR"]  # type: ignore[arg-type]
                sregs = m.sregs()
                sregs.cr8 = 7
                m.set_sregs(sregs)
                out["tpr_after_set_sregs"] = regs_of(lapic_page(k, m.vcpu_fd))["TPR"]  # type: ignore[arg-type]
    assert out["no_irqchip_seen"] == (5, 2, 2, 2) and out["irqchip_seen"] == (5, 2, 2, 2), out
    assert out["irqchip_exits"] == ["IO", "SHUTDOWN"] and out["tpr"] == 0x20, out
    assert out["tpr_after_set_sregs"] == 0x70
    return out
