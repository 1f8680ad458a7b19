"""A kick stops the guest between two instructions, never inside one.

A stop that lands after an instruction's store would roll the instruction back and run it
again: a read-modify-write would count twice. The counter below must come out exact however
often the vCPU is kicked out of the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kvmlab import sys as k
from kvmlab.kernel import fs
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.signals import kvm_vcpu_kick
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_HLT,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_userspace_memory_region,
)

ITERATIONS = 300_000
# 32-bit: mov ecx, N / l: inc dword ptr [0x3000] / dec ecx / jnz l / hlt
INC_LOOP = b"\xb9" + struct.pack("<I", ITERATIONS) + b"\xff\x05\x00\x30\x00\x00\x49\x75\xf7\xf4"
# 32-bit: mov ecx, 20 / l: dec ecx / jnz l / hlt
SHORT_LOOP = b"\xb9" + struct.pack("<I", 20) + b"\x49\x75\xfd\xf4"
HLT_END = 0x1000 + len(SHORT_LOOP)  # rip once the hlt has run


@dataclass
class Guest:
    """A flat 32-bit protected-mode vCPU with `code` at 0x1000, on the simulator."""

    fd: int
    ram: mmap.mmap
    run: kvm_run
    vcpu: KvmVcpu


@contextlib.contextmanager
def protected_mode_guest(code: bytes) -> Iterator[Guest]:
    kvm = k.open("/dev/kvm", os.O_RDWR)
    vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000 : 0x1000 + len(code)] = code
    hva = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, 0x10000, hva))
    fd = k.ioctl(vm, KVM_CREATE_VCPU, 0)
    shared = k.mmap(fd, 3 * 4096)
    run = kvm_run.from_buffer(shared)
    sregs = kvm_sregs()
    k.ioctl(fd, KVM_GET_SREGS, sregs)
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base, seg.limit, seg.db, seg.g = 0, 0xFFFFFFFF, 1, 1
    sregs.cr0 |= 1
    k.ioctl(fd, KVM_SET_SREGS, sregs)
    k.ioctl(fd, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
    vcpu = fs.fdget(fd).private_data
    assert isinstance(vcpu, KvmVcpu)
    guest = Guest(fd, ram, run, vcpu)
    del run
    try:
        yield guest
    finally:
        del guest.run  # the last view of the mapping: it can close
        shared.close()
        for f in (fd, vm, kvm):
            k.close(f)


@contextlib.contextmanager
def kicking(vcpu: KvmVcpu, pause: float) -> Iterator[None]:
    """Kick `vcpu` from another thread, every `pause` seconds, for the duration."""
    done = threading.Event()

    def kicker() -> None:
        while not done.is_set():
            kvm_vcpu_kick(vcpu)
            time.sleep(pause)

    thread = threading.Thread(target=kicker)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_kicks_never_run_an_instruction_twice() -> None:
    interrupted = 0
    with protected_mode_guest(INC_LOOP) as g, kicking(g.vcpu, 0.0002):
        while True:
            try:
                k.ioctl(g.fd, KVM_RUN, 0)
            except OSError as e:
                assert e.errno == errno.EINTR
                interrupted += 1
                continue
            if g.run.exit_reason == KVM_EXIT_HLT:
                break
        assert interrupted > 10  # the guest really was kicked out many times
        assert struct.unpack_from("<I", g.ram, 0x3000)[0] == ITERATIONS


def test_a_kick_as_the_guest_halts_never_hides_the_hlt() -> None:
    """A kick landing while HLT runs: KVM reports the HLT (the kick waits for the next entry).

    Were the kick reported instead (EINTR), rip would already be past the hlt, and the VMM
    would re-enter the guest after an instruction it never heard of.
    """
    hidden, halts, kicks = 0, 0, 0
    regs = kvm_regs()
    with protected_mode_guest(SHORT_LOOP) as g, kicking(g.vcpu, 0):
        for _ in range(3000):
            k.ioctl(g.fd, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
            while True:
                try:
                    k.ioctl(g.fd, KVM_RUN, 0)
                except OSError as e:
                    assert e.errno == errno.EINTR
                    kicks += 1
                    k.ioctl(g.fd, KVM_GET_REGS, regs)
                    if regs.rip == HLT_END:
                        hidden += 1
                        break
                    continue
                assert g.run.exit_reason == KVM_EXIT_HLT
                halts += 1
                break
    assert kicks > 10
    assert (hidden, halts) == (0, 3000)
