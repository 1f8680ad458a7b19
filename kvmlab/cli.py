"""The `kvmlab` command: `kvmlab demo` boots a tiny guest on the simulated /dev/kvm and shows
every exit, the way a first KVM program does."""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import sys
from types import ModuleType

from kvmlab import host
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


def run_demo(k: ModuleType, out: object = sys.stdout) -> int:
    """Run HELLO_16 through the syscall face `k`; print each exit; return the exit count."""
    write = out.write  # type: ignore[attr-defined]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a hello-world guest and show its exits")
    demo.add_argument("--backend", choices=("sim", "host"), default="sim")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.backend == "host":
            reason = host.available()
            if reason:
                parser.error(f"the host backend is unavailable: {reason}")
            backend: ModuleType = host
        else:
            from kvmlab import sys as backend
        run_demo(backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
