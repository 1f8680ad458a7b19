"""Resident memory across VM lifetimes and at the limits, on the simulator (the host's memory is
its kernel's, not this process's).

(e) 10,000 create/run/destroy cycles leave RSS flat: RSS before (after 100 cycles, the
    allocator's warm-up) and after, and the time per cycle. Target: it grows by less than
    5 MiB. (It grew by 25-35 MiB while each vCPU's Unicorn engine was freed by the garbage
    collector instead of with its VM: see close_engine in kvmlab/kernel/arch/x86/uc.py.)
(g) 1,000 vCPUs in one VM: RSS before, with them, and after closing them (each vCPU is a
    Unicorn engine; what closing leaves is the allocator's high-water mark, flat across rounds).
(h) A 1 GiB slot is mapped without copying: RSS grows by less than 16 MiB when it is added and
    a vCPU runs on it (the guest touches one page).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import time

from benchmarks.results import Figure, figure
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

FLAT_MIB = 5.0  # (e): RSS growth over the cycles that still counts as flat


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flat_real_mode(vcpu: int) -> kvm_sregs:
    """The reset state with CS based at 0, so rip is the physical address."""
    sregs = kvm_sregs()
    k.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base = sregs.cs.selector = 0
    return sregs


def vm_lifetimes(cycles: int) -> list[Figure]:
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
    growth = after - before
    verdict = "met" if growth < FLAT_MIB else "NOT met"
    print(f"(e) {cycles} VM lifetimes (create, a memslot, a vCPU, KVM_RUN, close)")
    print(
        f"    RSS {before:.1f} MiB -> {after:.1f} MiB   growth {growth:+.1f} MiB"
        f"   (target: flat, growth < {FLAT_MIB:g} MiB: {verdict})"
    )
    print(f"    {per_cycle * 1e3:.2f} ms per VM")
    k.close(kvm)
    return [
        figure("lifetimes", f"RSS growth over {cycles} VM lifetimes", growth, "MiB",
               target=f"value < {FLAT_MIB:g}"),
        figure("lifetimes", "one VM lifetime (create, slot, vCPU, run, close)",
               per_cycle * 1e3, "ms"),
    ]  # fmt: skip


def many_vcpus(count: int) -> list[Figure]:
    kvm = k.open("/dev/kvm", os.O_RDWR)
    rounds = []
    for _ in range(2):  # the second round shows whether closing gave it all back
        gc.collect()
        before = rss_mib()
        vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
        start = time.perf_counter()
        fds = [k.ioctl(vm, KVM_CREATE_VCPU, i) for i in range(count)]
        per_vcpu = (time.perf_counter() - start) / count
        with_them = rss_mib()
        for fd in fds:
            k.close(fd)
        k.close(vm)
        gc.collect()
        rounds.append((before, with_them, rss_mib(), per_vcpu))
    k.close(kvm)
    print(f"(g) {count} vCPUs in one VM, twice")
    for before, with_them, after, per_vcpu in rounds:
        print(f"    RSS {before:.1f} MiB -> {with_them:.1f} MiB with them -> {after:.1f} MiB "
              f"closed   {(with_them - before) / count * 1024:.0f} KiB and "
              f"{per_vcpu * 1e3:.2f} ms per vCPU")  # fmt: skip
    (_, _, first_after, _), (_, with_second, second_after, per_vcpu) = rounds
    print("    (target: the second round ends where the first did, ratio <= 1.05)")
    return [
        figure("lifetimes", f"RSS per vCPU ({count} in one VM)",
               (with_second - rounds[1][0]) / count * 1024, "KiB"),
        figure("lifetimes", f"RSS after a second round of {count} vCPUs", second_after, "MiB",
               "RSS after the first round", first_after, "ratio <= 1.05"),
        figure("lifetimes", "KVM_CREATE_VCPU", per_vcpu * 1e3, "ms"),
    ]  # fmt: skip


def big_slot(size: int = 1 << 30) -> list[Figure]:
    kvm = k.open("/dev/kvm", os.O_RDWR)
    ram = mmap.mmap(-1, size)
    ram[0x1000] = 0xF4  # hlt
    hva = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    gc.collect()
    before = rss_mib()
    vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, size, hva))
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
    k.ioctl(vcpu, KVM_SET_SREGS, flat_real_mode(vcpu))
    k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
    k.ioctl(vcpu, KVM_RUN, 0)
    grown = rss_mib() - before
    for fd in (vcpu, vm, kvm):
        k.close(fd)
    print(f"(h) a {size >> 20} MiB slot and a vCPU running on it: RSS +{grown:.1f} MiB"
          "   (target < 16 MiB: mapped, not copied)")  # fmt: skip
    return [figure("lifetimes", f"RSS growth for a {size >> 20} MiB slot and a run", grown, "MiB",
                   target="value < 16")]  # fmt: skip


def main(cycles: int = 10_000, vcpus: int = 1000) -> list[Figure]:
    return big_slot() + vm_lifetimes(cycles) + many_vcpus(vcpus)
