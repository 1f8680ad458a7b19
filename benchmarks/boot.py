"""Boot-to-exit time of the test kernels (tests/vmm/kernels) on kvmlab's PC: the simulator
beside the host's /dev/kvm, from a fresh VM to the kernel's isa-debug-exit write.

Each row: the kernel, its exits, the median of `runs` boots on each backend, and sim / host.
Needs gcc with 32-bit support to build the kernels; says so and skips otherwise.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType

from benchmarks.results import Figure, figure
from kvmlab import host
from kvmlab import sys as sim
from kvmlab.guests.kernels import build_kernels, toolchain_missing
from kvmlab.vmm.pc import pc_boot_kernel


def boot_time(k: ModuleType, image: bytes, name: str) -> tuple[float, int]:
    """Seconds from creating the VM to the kernel's exit, and the number of exits."""
    start = time.perf_counter()
    with pc_boot_kernel(image, k, name=name) as pc:
        pc.run(max_exits=1_000_000)
        elapsed = time.perf_counter() - start
        if pc.exit_code is None:
            raise RuntimeError(f"{name} did not exit on {k.name}: {pc.state}")
        return elapsed, len(pc.exit_log)


def main(runs: int = 5) -> list[Figure]:
    reason = toolchain_missing()
    if reason:
        print(f"(f) kernel boot: skipped, {reason}")
        return []
    figures = []
    backends = [sim] + ([] if host.available() else [host])
    with tempfile.TemporaryDirectory() as tmp:
        kernels = build_kernels(Path(tmp))
        print("(f) kernel boot to isa-debug-exit, median of", runs, "boots (ms)")
        print(f"    {'kernel':<10} {'exits':>6} {'sim':>9} {'host':>9} {'sim/host':>9}")
        for name, path in kernels.items():
            image = path.read_bytes()
            times: dict[str, float] = {}
            exits = 0
            for k in backends:
                samples = [boot_time(k, image, name) for _ in range(runs)]
                times[k.name] = statistics.median(t for t, _ in samples)
                exits = samples[0][1]
            ms = {b: f"{t * 1e3:9.1f}" for b, t in times.items()}
            missing = f"{'-':>9}"
            ratio = f"{times['sim'] / times['host']:9.2f}" if "host" in times else missing
            print(f"    {name:<10} {exits:>6} {ms['sim']} {ms.get('host', missing)} {ratio}")
            host_ms = times["host"] * 1e3 if "host" in times else None
            figures.append(
                figure(
                    "boot",
                    f"{name} boot to exit ({exits} exits)",
                    times["sim"] * 1e3,
                    "ms",
                    "host /dev/kvm" if host_ms else None,
                    host_ms,
                )
            )
        if "host" not in times:
            print(f"    (host: {host.available()})")
    return figures


if __name__ == "__main__":
    main()
