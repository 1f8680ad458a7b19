"""Assembled bytes run: a real-mode guest on the simulated /dev/kvm, driven as kvmlab's demo is."""

from __future__ import annotations

import ctypes
import mmap
import os

from kvmlab import sys as k
from kvmlab.asm import assemble
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
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

BASE = 0x1000
STACK = 0x8000
# Calls with an argument on the stack: right only if `push imm`, `call` and `ret 2` are the
# 16-bit encodings (Keystone's own would push 4 bytes each and print the wrong characters).
GUEST = f"""\
        mov sp, {STACK:#x}
        push '['            ; the argument: 2 bytes
        call putc           ; the return address: 2 bytes
        mov si, msg
next:   lodsb
        test al, al
        jz done
        push ax
        call putc
        jmp next
done:   push ']'
        call putc
        hlt
putc:   push bp
        mov bp, sp
        mov al, [bp+4]      ; [bp] saved bp, [bp+2] return address, [bp+4] the argument
        out 0xe9, al
        pop bp
        ret 2               ; pop the return address and the argument
msg:    .asciz "Hi"
"""


def run_real_mode(code: bytes) -> tuple[bytes, kvm_regs]:
    """Run `code` at BASE in real mode until HLT; return what it wrote to ports, and its regs."""
    kvm = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, 0x10000)
    ram[BASE : BASE + len(code)] = code
    region = kvm_userspace_memory_region(
        0, 0, 0, len(ram), ctypes.addressof(ctypes.c_char.from_buffer(ram))
    )
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
    shared = k.mmap(vcpu, k.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0))
    run = kvm_run.from_buffer(shared)
    sregs = kvm_sregs()
    k.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base = sregs.cs.selector = 0
    k.ioctl(vcpu, KVM_SET_SREGS, sregs)
    k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=BASE, rflags=2))
    printed = bytearray()
    for _ in range(100):
        k.ioctl(vcpu, KVM_RUN, 0)
        if run.exit_reason != KVM_EXIT_IO or run.io.direction != KVM_EXIT_IO_OUT:
            break
        printed += shared[run.io.data_offset : run.io.data_offset + run.io.size]
    assert run.exit_reason == KVM_EXIT_HLT
    regs = kvm_regs()
    k.ioctl(vcpu, KVM_GET_REGS, regs)
    del run
    shared.close()
    for fd in (vcpu, vm, kvm):
        k.close(fd)
    return bytes(printed), regs


def test_assembled_real_mode_program_with_calls_runs_on_the_simulator() -> None:
    program = assemble(GUEST, base=BASE)
    assert program.warnings == []
    printed, regs = run_real_mode(program.code)
    assert printed == b"[Hi]"
    assert regs.rsp == STACK  # every push and call was matched by 2-byte pops
    assert program.line_at(regs.rip - 1) == GUEST.splitlines().index("        hlt") + 1
