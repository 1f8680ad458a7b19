"""KVM_RUN speed: guest compute against bare Unicorn, and OUT exits against the host's /dev/kvm.

(a) Guest instructions per second for a compute loop under KVM_RUN, beside bare Unicorn running
    the same bytes (i) with no hooks and (ii) in the counted mode exact IO exits need.
    Target: sim / (ii) >= 0.9.
(b) OUT exits per second through kvmlab.sys.ioctl(KVM_RUN), beside the same Python program on
    the host's /dev/kvm. Target: sim / host >= 1.0.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import statistics
import struct
import threading
import time
from types import ModuleType

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from benchmarks.results import Figure, figure
from kvmlab import host
from kvmlab import sys as sim
from kvmlab.kernel import trace
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_DEBUG,
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_GET_SREGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_RUN,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    kvm_guest_debug,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
)

BASE = 0x1000
RAM = 0x10000


def compute_loop(iterations: int) -> tuple[bytes, int]:
    """`mov ecx, N; l: add eax, 1; add ebx, eax; dec ecx; jnz l; hlt` (4N+2 instructions).

    Encoded the same in 32- and 64-bit mode (`dec ecx` as FF C9), so bare Unicorn, which starts
    in 64-bit mode, runs exactly what the 32-bit guest runs.
    """
    code = bytes([0xB9]) + struct.pack("<I", iterations)
    code += bytes([0x83, 0xC0, 0x01, 0x01, 0xC3, 0xFF, 0xC9, 0x75, 0xF7, 0xF4])
    return code, 4 * iterations + 2


OUT_LOOP = bytes([0xE6, 0x10, 0xEB, 0xFC])  # l: out 0x10, al / jmp l
MMIO_LOOP = bytes([0xA3, 0x00, 0x00, 0x10, 0x00, 0xEB, 0xF9])  # l: mov [0x100000], eax / jmp l
SPIN = bytes([0x90, 0xEB, 0xFD])  # l: nop / jmp l


class Guest:
    """A one-vCPU VM in 32-bit flat protected mode running `code` at BASE."""

    def __init__(self, k: ModuleType, code: bytes) -> None:
        self.k = k
        self.kvm = k.open("/dev/kvm", os.O_RDWR)
        self.vm = k.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.ram = mmap.mmap(-1, RAM)
        self.ram[BASE : BASE + len(code)] = code
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
        k.ioctl(
            self.vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, RAM, addr)
        )
        self.vcpu = k.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        self.shared = k.mmap(self.vcpu, k.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0))
        self.run = kvm_run.from_buffer(self.shared)
        sregs = kvm_sregs()
        k.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.base, seg.limit, seg.g, seg.db = 0, 0xFFFFFFFF, 1, 1
            seg.selector = 0x10
        sregs.cs.selector, sregs.cs.type = 0x8, 0xB
        sregs.cr0 |= 1
        k.ioctl(self.vcpu, KVM_SET_SREGS, sregs)
        k.ioctl(self.vcpu, KVM_SET_REGS, kvm_regs(rip=BASE, rflags=2))

    def close(self) -> None:
        del self.run
        self.shared.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            self.k.close(fd)


def guest_compute(k: ModuleType, iterations: int) -> float:
    code, n = compute_loop(iterations)
    g = Guest(k, code)
    t = time.perf_counter()
    k.ioctl(g.vcpu, KVM_RUN, 0)
    dt = time.perf_counter() - t
    assert g.run.exit_reason == KVM_EXIT_HLT, g.run.exit_reason
    g.close()
    return n / dt


def bare_unicorn(iterations: int, counted: bool) -> float:
    code, n = compute_loop(iterations)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    ram = mmap.mmap(-1, RAM)
    ram[BASE : BASE + len(code)] = code
    uc.mem_map_ptr(0, RAM, UC_PROT_ALL, ctypes.addressof(ctypes.c_char.from_buffer(ram)))
    if counted:
        uc.hook_add(UC_HOOK_INSN, lambda *a: None, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, lambda *a: 0, None, 1, 0, UC_X86_INS_IN)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
    t = time.perf_counter()
    if counted:
        uc.emu_start(BASE, 0, count=n)
    else:
        uc.emu_start(BASE, BASE + len(code) - 1)
    return n / (time.perf_counter() - t)


def out_exits(k: ModuleType, count: int) -> float:
    g = Guest(k, OUT_LOOP)
    run, vcpu, ioctl = g.run, g.vcpu, k.ioctl
    t = time.perf_counter()
    for _ in range(count):
        ioctl(vcpu, KVM_RUN, 0)
    dt = time.perf_counter() - t
    assert run.exit_reason == KVM_EXIT_IO
    del run
    g.close()
    return count / dt


def exits_per_second(k: ModuleType, code: bytes, reason: int, count: int, step: bool) -> float:
    """KVM_RUN `count` times on a guest whose every run ends in `reason`; runs per second."""
    g = Guest(k, code)
    if step:
        control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        k.ioctl(g.vcpu, KVM_SET_GUEST_DEBUG, kvm_guest_debug(control))
    vcpu, ioctl = g.vcpu, k.ioctl
    t = time.perf_counter()
    for _ in range(count):
        ioctl(vcpu, KVM_RUN, 0)
    dt = time.perf_counter() - t
    assert g.run.exit_reason == reason
    g.close()
    return count / dt


def mmio_exits(k: ModuleType, count: int) -> float:
    return exits_per_second(k, MMIO_LOOP, KVM_EXIT_MMIO, count, step=False)


def step_exits(k: ModuleType, count: int) -> float:
    return exits_per_second(k, SPIN, KVM_EXIT_DEBUG, count, step=True)


def kick_latency(k: ModuleType, kicks: int = 20) -> float:
    """Median seconds from pthread_kill(SIGUSR1) to KVM_RUN returning, on a spinning guest."""
    signal.signal(signal.SIGUSR1, lambda *_: None)
    g = Guest(k, SPIN)
    latencies = []
    for _ in range(kicks):
        done: list[float] = []

        def vcpu_thread(done: list[float] = done) -> None:
            try:
                k.ioctl(g.vcpu, KVM_RUN, 0)
            except InterruptedError:
                done.append(time.perf_counter())

        thread = threading.Thread(target=vcpu_thread)
        thread.start()
        time.sleep(0.02)
        sent = time.perf_counter()
        signal.pthread_kill(thread.ident or 0, signal.SIGUSR1)
        thread.join(5)
        assert done, "KVM_RUN did not return after the signal"
        latencies.append(done[0] - sent)
    g.close()
    return statistics.median(latencies)


def best(f, *args, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    return max(f(*args) for _ in range(repeat))


def main() -> list[Figure]:
    g = "kvm_run"
    n = 20_000_000
    sim_rate = best(guest_compute, sim, n)
    plain = best(bare_unicorn, n, False)
    counted = best(bare_unicorn, n, True)
    print("(a) guest compute, instructions/s")
    print(f"    kvmlab KVM_RUN            {sim_rate / 1e6:8.1f} M/s")
    print(f"    bare Unicorn, no hooks    {plain / 1e6:8.1f} M/s   ratio {sim_rate / plain:.2f}")
    print(f"    bare Unicorn, counted     {counted / 1e6:8.1f} M/s   ratio {sim_rate / counted:.2f}"
          "   (target >= 0.9)")  # fmt: skip
    figures = [figure(g, "guest compute", sim_rate / 1e6, "M/s", "bare Unicorn, counted",
                      counted / 1e6, "ratio >= 0.9")]  # fmt: skip
    reason = host.available()
    if reason is None:
        host_rate = guest_compute(host, 500_000)
        print(f"    host /dev/kvm             {host_rate / 1e6:8.1f} M/s   ratio "
              f"{sim_rate / host_rate:.2f}")  # fmt: skip
    exits = 50_000
    sim_exits = best(out_exits, sim, exits)
    print("(b) OUT exits/s through KVM_RUN from Python")
    print(f"    kvmlab                    {sim_exits / 1e3:8.1f} k/s")
    if reason is None:
        host_exits = best(out_exits, host, exits)
        print(f"    host /dev/kvm             {host_exits / 1e3:8.1f} k/s   ratio "
              f"{sim_exits / host_exits:.2f}   (target >= 1.0)")  # fmt: skip
        figures.append(figure(g, "OUT exits", sim_exits / 1e3, "k/s", "host /dev/kvm",
                              host_exits / 1e3, "ratio >= 1.0"))  # fmt: skip
    else:
        figures.append(figure(g, "OUT exits", sim_exits / 1e3, "k/s"))
        print(f"    host /dev/kvm: skipped ({reason})")
    for label, bench, n in (
        ("MMIO write", mmio_exits, 20_000),
        ("single-step", step_exits, 20_000),
    ):
        print(f"(b) {label} exits/s through KVM_RUN from Python")
        rate = best(bench, sim, n)
        line = f"    kvmlab {rate / 1e3:8.1f} k/s"
        ref = None
        if reason is None:
            ref = host_rate = best(bench, host, n)
            line += f"   host {host_rate / 1e3:8.1f} k/s   ratio {rate / host_rate:.2f}"
        print(line)
        figures.append(figure(g, f"{label} exits", rate / 1e3, "k/s",
                              "host /dev/kvm" if ref else None, ref and ref / 1e3))  # fmt: skip
    print("(d) kick: median of 20, SIGUSR1 to a vCPU thread spinning in the guest -> EINTR")
    kick = kick_latency(sim) * 1e3
    line = f"    kvmlab {kick:6.2f} ms"
    host_kick = None
    if reason is None:
        host_kick = kick_latency(host) * 1e3
        line += f"   host {host_kick:6.2f} ms"
    print(line + "   (target < 50 ms)")
    host_ref = "host /dev/kvm" if host_kick else None
    figures.append(
        figure(g, "kick latency (median)", kick, "ms", host_ref, host_kick, "value < 50")
    )
    print("(c) the call-path trace: OUT exits/s with tracing off, on, and off again")
    before = best(out_exits, sim, exits)
    with trace.recording():
        during = out_exits(sim, exits // 10)
    after = best(out_exits, sim, exits)
    print(
        f"    off {before / 1e3:8.1f} k/s   on {during / 1e3:8.1f} k/s   off again "
        f"{after / 1e3:8.1f} k/s   ratio off-again/off {after / before:.2f}   (target >= 0.98)"
    )
    figures.append(figure(g, "OUT exits after a traced run", after / 1e3, "k/s",
                          "before tracing", before / 1e3, "ratio >= 0.98"))  # fmt: skip
    figures.append(figure(g, "OUT exits while tracing", during / 1e3, "k/s"))
    return figures
