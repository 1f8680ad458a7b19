"""Resident memory across many VM lifetimes: 2,000 create/run/destroy cycles leave it flat.

Printed as RSS before and after, against the first 100 cycles (the allocator's warm-up), and
the time per cycle, on the simulator (the host's memory is its kernel's, not this process's).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import time

from kvmlab import sys as k
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_SREGS,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    kvm_regs,
    kvm_sregs,
    kvm_userspace_memory_region,
)


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flat_real_mode(vcpu: int) -> kvm_sregs:
    """The reset state with CS based at 0, so rip is the physical address."""
    sregs = kvm_sregs()
    k.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base = sregs.cs.selector = 0
    return sregs


def main(cycles: int = 2000) -> None:
    kvm = k.open("/dev/kvm", os.O_RDWR)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000] = 0xF4  # hlt
    hva = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    region = kvm_userspace_memory_region(0, 0, 0, len(ram), hva)

    def cycle() -> None:
        vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
        k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
        k.ioctl(vcpu, KVM_SET_SREGS, flat_real_mode(vcpu))
        k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
        k.ioctl(vcpu, KVM_RUN, 0)
        k.close(vcpu)
        k.close(vm)

    for _ in range(100):
        cycle()
    gc.collect()
    before = rss_mib()
    start = time.perf_counter()
    for _ in range(cycles):
        cycle()
    per_cycle = (time.perf_counter() - start) / cycles
    gc.collect()
    after = rss_mib()
    print(f"(e) {cycles} VM lifetimes (create, a memslot, a vCPU, KVM_RUN, close)")
    print(f"    RSS {before:.1f} MiB -> {after:.1f} MiB   ratio {after / before:.2f}"
          f"   {per_cycle * 1e3:.2f} ms per VM   (target: flat)")  # fmt: skip
    k.close(kvm)
