"""The `kvmlab` command: `kvmlab demo` boots a tiny guest on the simulated /dev/kvm and shows
every exit, the way a first KVM program does."""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import sys
import threading
from collections import Counter
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kvmlab import host

if TYPE_CHECKING:
    from kvmlab.vmm import Machine
from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_GET_API_VERSION,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
)

GUEST_BASE = 0x1000
MESSAGE = b"Hello from a kvmlab guest!\n\0"
# Real mode, loaded at 0x1000: print MESSAGE on the serial port 0x3f8, one OUT per byte, then HLT.
#   mov si, msg / mov dx, 0x3f8 / l: lodsb / test al, al / jz done / out dx, al / jmp l / done: hlt
HELLO_16 = (
    bytes([0xBE]) + struct.pack("<H", GUEST_BASE + 0x0F)
    + bytes([0xBA, 0xF8, 0x03, 0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8, 0xF4])
    + MESSAGE
)  # fmt: skip


def run_demo(k: ModuleType, out: Any = None) -> int:
    """Run HELLO_16 through the syscall face `k`; print each exit; return the exit count."""
    write = (out or sys.stdout).write
    kvm = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    write(f"KVM_GET_API_VERSION = {k.ioctl(kvm, KVM_GET_API_VERSION, 0)}\n")
    vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, 0x10000)
    ram[GUEST_BASE : GUEST_BASE + len(HELLO_16)] = HELLO_16
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    region = kvm_userspace_memory_region(0, 0, 0, len(ram), addr)
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
    size = k.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    shared = k.mmap(vcpu, size)
    run = kvm_run.from_buffer(shared)
    sregs = kvm_sregs()
    k.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base, sregs.cs.selector = 0, 0
    k.ioctl(vcpu, KVM_SET_SREGS, sregs)
    k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=GUEST_BASE, rflags=2))
    exits = 0
    printed = bytearray()
    while True:
        k.ioctl(vcpu, KVM_RUN, 0)
        exits += 1
        name = EXIT_REASON_NAMES.get(run.exit_reason, str(run.exit_reason))
        if run.exit_reason == KVM_EXIT_IO and run.io.direction == KVM_EXIT_IO_OUT:
            data = shared[run.io.data_offset : run.io.data_offset + run.io.size]
            printed += data
            write(f"exit {exits:3}: KVM_EXIT_{name} port={run.io.port:#x} data={bytes(data)!r}\n")
            continue
        regs = kvm_regs()
        k.ioctl(vcpu, KVM_GET_REGS, regs)
        write(f"exit {exits:3}: KVM_EXIT_{name} rip={regs.rip:#x}\n")
        if run.exit_reason == KVM_EXIT_HLT or exits > 1000:
            break
    write(f"serial output: {printed.decode(errors='replace')}")
    del run
    shared.close()
    for fd in (vcpu, vm, kvm):
        k.close(fd)
    return exits


ASM_MODES = {"real": "16", "protected": "32", "long": "64"}
EXIT_OK, EXIT_USAGE, EXIT_RUNAWAY, EXIT_GUEST_ERROR = 0, 2, 3, 4


def _backend(name: str) -> ModuleType:
    if name == "host":
        reason = host.available()
        if reason:
            raise SystemExit(f"kvmlab: the host backend is unavailable: {reason}")
        return host
    from kvmlab import sys as sim

    return sim


def _guest_code(path: str, mode: str, entry: int) -> bytes:
    """The bytes of GUEST: assembled from a .asm source, or a flat .bin image as it is."""
    try:
        data = open(path, "rb").read()  # noqa: SIM115 (read at once)
    except OSError as e:
        raise SystemExit(f"kvmlab: cannot read {path}: {e.strerror}") from None
    if not path.endswith(".asm"):
        return data
    from kvmlab.asm import AsmError, assemble

    try:
        return assemble(data.decode(errors="replace"), mode=ASM_MODES[mode], base=entry).code
    except AsmError as e:
        raise SystemExit(f"kvmlab: {path}: {e}") from None


def _machine(args: argparse.Namespace, k: ModuleType) -> Machine:
    """A machine with GUEST booted: a file (.asm or flat .bin), or a sample guest by name,
    which brings its own CPU mode, vCPUs, devices, typed input and (unless --irqchip says)
    the place of its interrupt controllers."""
    from kvmlab.guests import SAMPLES
    from kvmlab.vmm import Machine

    if not os.path.exists(args.guest) and args.guest in SAMPLES:
        try:
            sample = SAMPLES[args.guest].machine(k, irqchip=args.irqchip)
        except ValueError as e:  # a sample that cannot run with this irqchip
            raise SystemExit(f"kvmlab: {e}") from None
        except (OSError, RuntimeError) as e:
            raise SystemExit(f"kvmlab: cannot create the VM: {e}") from None
        assert isinstance(sample, Machine)  # the x86 samples boot on the PC
        return sample
    code = _guest_code(args.guest, args.mode, args.entry)
    try:
        m = Machine(k, irqchip=args.irqchip or "user")
    except (OSError, RuntimeError) as e:  # KVM lacks what the irqchip needs
        raise SystemExit(f"kvmlab: cannot create the VM: {e}") from None
    try:
        m.boot(code, mode=args.mode, entry=args.entry)
    except BaseException:
        m.close()
        raise
    return m


def _run(m: Machine, max_exits: int, timeout: float) -> tuple[int, bool]:
    """Run to a halt (on this thread, or on vCPU threads for several vCPUs); the last
    kvm_cpu_exec result and whether `timeout` ran out first."""
    from kvmlab.vmm import EXCP_HLT, EXCP_INTERRUPT

    if len(m.cpus) > 1:
        m.start()
        quiet = m.wait(timeout)
        halted = all(cpu.halted for cpu in m.cpus)
        m.stop()
        return (EXCP_HLT if halted else EXCP_INTERRUPT), not quiet
    timer = threading.Timer(timeout, m.stop)
    timer.start()
    try:
        result = m.run(max_exits=max_exits)
    finally:
        timer.cancel()
    return result, m.state == "stopped" and m.exit_code is None


def run_guest(args: argparse.Namespace, out: Any = None) -> int:
    """`kvmlab run`: boot GUEST on a small machine, print its serial output and its exits."""
    from kvmlab.kernel import trace
    from kvmlab.vmm import EXCP_HLT

    out = out or sys.stdout
    k = _backend(args.backend)
    recording = trace.recording() if args.trace and k.name == "sim" else None
    with _machine(args, k) as m:
        if recording is not None:
            with recording as rec:
                result, timed_out = _run(m, args.max_exits, args.timeout)
        else:
            result, timed_out = _run(m, args.max_exits, args.timeout)
        out.write(m.serial.text())
        if m.serial.output and not m.serial.output.endswith(b"\n"):
            out.write("\n")
        out.write(f"{'seq':>5}  {'exit':<15} {'rip':>10}  {'where':>10}  dir    data\n")
        for r in m.exit_log:
            where = "" if r.address is None else hex(r.address)
            rip = "" if r.rip is None else hex(r.rip)
            data = r.data.hex() if r.data else r.detail
            out.write(f"{r.seq:5}  {r.reason:<15} {rip:>10}  {where:>10}  {r.direction or '':5}  "
                      f"{data}\n")  # fmt: skip
        if recording is not None:
            lines = rec.tree().splitlines()
            out.write("\n".join(lines[:400]) + "\n")
            if len(lines) > 400:
                out.write(f"... {len(lines) - 400} more trace lines\n")
        if args.trace and recording is None:
            out.write("(the call-path trace is the simulator's: use --backend sim)\n")
        if m.exit_code is not None:
            out.write(f"guest exit code {m.exit_code}\n")
            return EXIT_OK if m.exit_code in (0, 1) else EXIT_GUEST_ERROR
        if timed_out:
            out.write(f"kvmlab: stopped a runaway guest after {args.timeout} s\n")
            return EXIT_RUNAWAY
        if result != EXCP_HLT:
            if m.state in ("internal-error", "shutdown"):
                out.write(f"kvmlab: the guest ended in {m.state}\n")
                return EXIT_GUEST_ERROR
            out.write(f"kvmlab: stopped after {args.max_exits} exits without a HLT\n")
            return EXIT_RUNAWAY
    return EXIT_OK


def list_samples(out: Any) -> None:
    """The sample guests `kvmlab run NAME` boots."""
    from kvmlab.guests import SAMPLES

    out.write("sample guests (kvmlab run NAME):\n")
    for name, guest in SAMPLES.items():
        out.write(f"  {name:<16} {guest.mode:<10} {guest.title}\n")


PC_RAM_MB = 128  # QEMU's default -m
KERNEL_MAX_EXITS = 1_000_000


def run_kernel(args: argparse.Namespace, out: Any = None, err: Any = None) -> int:
    """`kvmlab run --kernel IMAGE`: boot a multiboot kernel on a PC, as QEMU's -kernel does.

    stdout carries the kernel's serial output as it comes; stderr a summary of the exits.
    The status is the kernel's isa-debug-exit code ((value << 1) | 1, an odd number), 1 for
    an image that cannot boot (as QEMU), EXIT_GUEST_ERROR if the kernel never asked to exit.
    """
    from kvmlab.vmm.multiboot import MultibootError
    from kvmlab.vmm.pc import pc_boot_kernel

    out, err = out or sys.stdout, err or sys.stderr
    k = _backend(args.backend)
    try:
        image = open(args.kernel, "rb").read()  # noqa: SIM115 (read at once)
    except OSError as e:
        raise SystemExit(f"kvmlab: cannot read {args.kernel}: {e.strerror}") from None
    max_exits = args.max_exits or KERNEL_MAX_EXITS
    try:
        pc = pc_boot_kernel(
            image,
            k,
            name=args.kernel,
            cmdline=args.append,
            cpus=args.smp,
            ram_size=args.mem << 20,
            irqchip=args.irqchip or "user",
        )
    except ValueError as e:  # MultibootError, or a bad --smp/--mem
        what = "" if isinstance(e, MultibootError) else "bad machine: "
        raise SystemExit(f"kvmlab: {args.kernel}: {what}{e}") from None
    except OSError as e:  # KVM refused the VM (too many vCPUs, too much RAM)
        raise SystemExit(f"kvmlab: cannot create the VM: {e.strerror or e}") from None
    except RuntimeError as e:  # KVM lacks what the irqchip needs
        raise SystemExit(f"kvmlab: cannot create the VM: {e}") from None

    def show(data: bytes) -> None:
        out.write(data.decode(errors="replace"))
        out.flush()

    with pc:
        pc.serial.on_output = show
        timer = threading.Timer(args.timeout, pc.stop)
        timer.start()
        try:
            pc.run(max_exits=max_exits)
        finally:
            timer.cancel()
        counts = Counter(pc.exit_log.reasons())
        summary = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
        err.write(f"kvmlab: {pc.exit_log.dropped + len(pc.exit_log)} exits ({summary})\n")
        if pc.exit_code is not None:
            err.write(f"kvmlab: the kernel exited with code {pc.exit_code}\n")
            return pc.exit_code & 0xFF
        if pc.state == "stopped":
            why = f"did not exit within {args.timeout} s"
        elif pc.state == "internal-error":
            why = f"stopped on an error:\n{pc.cpus[0].last_error}"
        elif pc.cpus[0].halted:
            why = "halted with interrupts off, without writing to isa-debug-exit (0xf4)"
        else:
            why = f"did not exit within {max_exits} exits"
        err.write(f"kvmlab: the kernel {why}\n")
        return EXIT_GUEST_ERROR


def show_info(out: Any = None) -> int:
    """`kvmlab info`: which backends this machine has, and what each reports."""
    from kvmlab import sys as sim
    from kvmlab.uapi import KVM_CHECK_EXTENSION, KVM_GET_API_VERSION
    from kvmlab.uapi import kvm as uapi_kvm

    out = out or sys.stdout
    caps = {n: v for n, v in vars(uapi_kvm).items() if n.startswith("KVM_CAP_")}
    reason = host.available()
    backends: list[tuple[str, ModuleType | None, str]] = [
        ("sim", sim, "kvmlab's simulated /dev/kvm (Unicorn)"),
        ("host", None if reason else host, reason or "the host's /dev/kvm"),
    ]
    for name, k, what in backends:
        out.write(f"{name}: {what}\n")
        if k is None:
            continue
        fd = k.open("/dev/kvm", os.O_RDWR)
        try:
            out.write(f"  KVM_GET_API_VERSION = {k.ioctl(fd, KVM_GET_API_VERSION, 0)}\n")
            present = {c: k.ioctl(fd, KVM_CHECK_EXTENSION, v) for c, v in caps.items()}
        finally:
            k.close(fd)
        for cap, value in sorted(present.items()):
            if value:
                out.write(f"  {cap} = {value}\n")
    list_samples(out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The `kvmlab` command; a reader that goes away (`kvmlab run timer | head`) ends it quietly,
    as it ends any Unix tool."""
    try:
        return _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_GUEST_ERROR


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="kvmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a hello-world guest and show its exits")
    demo.add_argument("--backend", choices=("sim", "host"), default="sim")
    run = sub.add_parser(
        "run",
        help="boot GUEST (.asm, flat .bin, or a sample's name: see `kvmlab info`) and show its "
        "output and exits, or a multiboot kernel with --kernel, as QEMU's -kernel",
    )
    run.add_argument("guest", nargs="?")
    run.add_argument("--kernel", metavar="IMAGE", help="a multiboot kernel (ELF or a.out kludge)")
    run.add_argument("--append", metavar="CMDLINE", default="", help="the kernel's command line")
    run.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (with --kernel)")
    run.add_argument("--mem", type=int, default=PC_RAM_MB, metavar="MB", help="RAM (--kernel)")
    run.add_argument("--mode", choices=tuple(ASM_MODES), default="real")
    run.add_argument("--backend", choices=("sim", "host"), default="sim")
    run.add_argument(
        "--irqchip",
        choices=("user", "kernel"),
        help="where the PIC, PIT and APICs are: the VMM (user: KVM_INTERRUPT, HLT exits) or "
        "KVM (kernel: KVM_CREATE_IRQCHIP, KVM_IRQ_LINE); default: user, or a sample's own",
    )
    run.add_argument("--entry", type=lambda v: int(v, 0), default=0x1000)
    run.add_argument("--trace", action="store_true", help="print the kernel's call path")
    run.add_argument("--max-exits", type=int, help="default: 10,000 (guest), 1,000,000 (kernel)")
    run.add_argument("--timeout", type=float, default=10.0, help="seconds before a stop")
    sub.add_parser("info", help="the backends on this machine and their capabilities")
    from kvmlab.grader.cli import add_commands  # the graded exercises: `exercises`, `grade`

    add_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "handler"):
        return int(args.handler(args))
    if args.command == "run":
        if (args.guest is None) == (args.kernel is None):
            run.error("give either GUEST or --kernel IMAGE")
        if args.kernel is not None:
            return run_kernel(args)
        args.max_exits = args.max_exits or 10_000
        return run_guest(args)
    if args.command == "info":
        return show_info()
    run_demo(_backend(args.backend))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
