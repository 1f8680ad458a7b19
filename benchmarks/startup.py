"""What a notebook waits for before its first KVM_RUN.

(i) `import kvmlab` and `import kvmlab.sys` (which loads the simulated kvm module): the median
    of 5 fresh interpreters, beside an interpreter that imports nothing.
(j) VM + vCPU creation: open /dev/kvm, KVM_CREATE_VM, KVM_CREATE_VCPU, mmap kvm_run, close
    all; the median of 50 on the simulator beside the same calls on the host's /dev/kvm.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from types import ModuleType

from benchmarks.results import Figure, figure
from kvmlab import host
from kvmlab import sys as sim
from kvmlab.uapi import KVM_CREATE_VCPU, KVM_CREATE_VM, KVM_GET_VCPU_MMAP_SIZE


def interpreter_time(statement: str, runs: int = 5) -> float:
    """Median seconds for a fresh interpreter to run `statement` and exit."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def vm_and_vcpu(k: ModuleType, runs: int = 50) -> float:
    """Median seconds from open("/dev/kvm") to a mapped vCPU, closing everything after."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        kvm = k.open("/dev/kvm", os.O_RDWR)
        vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
        vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
        shared = k.mmap(vcpu, k.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0))
        samples.append(time.perf_counter() - start)
        shared.close()
        for fd in (vcpu, vm, kvm):
            k.close(fd)
    return statistics.median(samples)


def main() -> list[Figure]:
    bare = interpreter_time("pass")
    figures = []
    print("(i) import time, median of 5 fresh interpreters (the bare interpreter subtracted)")
    for module in ("kvmlab", "kvmlab.sys"):
        cost = interpreter_time(f"import {module}") - bare
        print(f"    import {module:<12} {cost * 1e3:8.1f} ms   (bare {bare * 1e3:.1f} ms)")
        figures.append(figure("startup", f"import {module}", cost * 1e3, "ms"))
    print("(j) open /dev/kvm + KVM_CREATE_VM + KVM_CREATE_VCPU + mmap, median of 50")
    sim_time = vm_and_vcpu(sim)
    reason = host.available()
    host_time = vm_and_vcpu(host) if reason is None else None
    line = f"    kvmlab {sim_time * 1e3:8.2f} ms"
    if host_time is not None:
        line += f"   host {host_time * 1e3:8.2f} ms   ratio {sim_time / host_time:.1f}"
    else:
        line += f"   host: skipped ({reason})"
    print(line)
    figures.append(
        figure(
            "startup",
            "VM + vCPU creation",
            sim_time * 1e3,
            "ms",
            "host /dev/kvm" if host_time else None,
            host_time and host_time * 1e3,
        )
    )
    return figures


if __name__ == "__main__":
    main()
