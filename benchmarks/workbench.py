"""The Workbench's own cost, on each backend present.

(a) Step KVM_RUN with every panel refreshed, for a 4 KiB guest: the median time of a click on
    the widget's button, and the part of it spent outside Machine.step (model + widget side).
    Target: model + widget side < 30 ms.
(b) Run mode against a plain Machine.run of the same guest (20,000 OUT exits, then HLT), with
    the view refreshed 10 times a second while it runs. Target: slowdown <= 10%.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.results import Figure, figure
from kvmlab import host
from kvmlab.asm import assemble
from kvmlab.vmm import Machine
from kvmlab.workbench import Workbench, WorkbenchWidget
from kvmlab.workbench.model import backend

STEPS = 200
ROUNDS = 5
EXITS = 20_000
# 4 KiB of guest code: an OUT loop, the rest of the page filled with NOPs after the HLT
STEP_GUEST = "l: out 0x80, al\ninc ax\njmp l\nhlt\n.fill 4096 - 6, 1, 0x90\n"
RUN_GUEST = f"mov cx, {EXITS}\nl: out 0x80, al\nloop l\nhlt\n"


def step_latency(name: str) -> tuple[float, float]:
    """(median click time, median time outside Machine.step) of Step KVM_RUN, in seconds."""
    wb = Workbench(STEP_GUEST, backend=name)
    view = WorkbenchWidget(wb)
    view.buttons["assemble"].click()
    assert wb.program is not None and len(wb.program.code) == 4096, wb.errors
    m = wb.machine
    assert m is not None
    inside: list[float] = []
    step = m.step

    def timed_step(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return step(*args)
        finally:
            inside.append(time.perf_counter() - t)

    m.step = timed_step  # type: ignore[method-assign]
    totals, outside = [], []
    for _ in range(STEPS):
        inside.clear()
        t = time.perf_counter()
        view.buttons["step_kvm_run"].click()
        total = time.perf_counter() - t
        totals.append(total)
        outside.append(total - sum(inside))
    assert not wb.errors, wb.errors
    wb.close()
    return statistics.median(totals), statistics.median(outside)


def plain_run(name: str) -> float:
    code = assemble(RUN_GUEST, mode="16", base=0x1000).code
    with Machine(backend(name), ram_size=0x10000) as m:
        m.boot(code, entry=0x1000)
        t = time.perf_counter()
        m.run(max_exits=EXITS * 2)
        elapsed = time.perf_counter() - t
        assert m.cpus[0].halted
    return elapsed


def workbench_run(name: str) -> float:
    wb = Workbench(RUN_GUEST, backend=name)
    view = WorkbenchWidget(wb)
    view.buttons["assemble"].click()
    t = time.perf_counter()
    view.buttons["run"].click()
    assert wb.wait(60)
    elapsed = time.perf_counter() - t
    assert wb.exit_counts()["IO"] == EXITS and not wb.errors, wb.errors
    wb.close()
    return elapsed


def main() -> list[Figure]:
    figures = []
    names = ["sim"] + (["host"] if host.available() is None else [])
    print("(a) Step KVM_RUN with every panel refreshed, 4 KiB guest: median of", STEPS)
    for name in names:
        total, outside = step_latency(name)
        print(f"    {name:4}  click {total * 1e3:6.2f} ms   model + widget {outside * 1e3:6.2f} ms"
              "   (target < 30 ms)")  # fmt: skip
        figures.append(
            figure(
                "workbench",
                f"Step click, model + widget side ({name})",
                outside * 1e3,
                "ms",
                target="value < 30",
            )
        )
        figures.append(figure("workbench", f"Step click, total ({name})", total * 1e3, "ms"))
    print(f"(b) Run mode vs. Machine.run, {EXITS} OUT exits, best of {ROUNDS} (alternated)")
    for name in names:
        plain, wb = float("inf"), float("inf")
        for _ in range(ROUNDS):  # alternate, so that load from elsewhere hits both alike
            plain = min(plain, plain_run(name))
            wb = min(wb, workbench_run(name))
        print(f"    {name:4}  Machine.run {plain:6.3f} s   Workbench Run {wb:6.3f} s   slowdown "
              f"{(wb / plain - 1) * 100:5.1f}%   (target <= 10%)")  # fmt: skip
        figures.append(
            figure(
                "workbench",
                f"Workbench Run time ({name})",
                wb,
                "s",
                "Machine.run",
                plain,
                "ratio <= 1.10",
            )
        )
    return figures


if __name__ == "__main__":
    main()
