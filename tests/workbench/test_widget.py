"""The Workbench widget driven through its button handlers, as a browser click would."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest

from kvmlab.workbench import Workbench, WorkbenchWidget, panels, widget

Make = Callable[..., Workbench]
SOURCE = "mov dx, 0x3f8\nmov al, 'K'\nout dx, al\nhlt\n"


def test_every_button_through_its_click(make_wb: Make) -> None:
    wd = WorkbenchWidget(make_wb(SOURCE, assemble=False))
    wd.editor.value = SOURCE
    wd.buttons["assemble"].click()
    assert "mov dx, 0x3f8" in wd.html["listing"].value
    wd.buttons["step_kvm_run"].click()
    run = wd.html["kvm_run"].value
    assert '<span class="kvmlab-exit-reason">2 KVM_EXIT_IO</span>' in run
    assert '<span class="kvmlab-io-port">0x3f8</span>' in run
    assert "io.data_offset 0x1000" in run
    assert "K" in wd.html["serial"].value
    assert 'class="kvmlab-changed"' in wd.html["registers"].value
    assert "<svg" in wd.html["exits"].value
    assert "slot 0" in wd.html["memory"].value
    assert "kvmlab-current" in wd.html["disassembly"].value
    if wd.model.backend == "sim":
        assert "kvm_vcpu_ioctl(vcpu=0, cmd=KVM_RUN)" in wd.html["trace"].value
    wd.buttons["step_instruction"].click()
    assert "KVM_EXIT_DEBUG" in wd.html["kvm_run"].value
    wd.buttons["back"].click()
    assert "KVM_EXIT_IO" in wd.html["kvm_run"].value
    wd.buttons["reset"].click()
    assert wd.model.linear_rip() == 0x1000
    wd.buttons["run"].click()
    assert wd.model.wait(5)
    wd.buttons["stop"].click()
    assert "KVM_EXIT_HLT" in wd.html["kvm_run"].value
    assert not wd.model.errors, wd.model.errors


def test_callback_errors_are_shown_not_lost(make_wb: Make) -> None:
    wd = WorkbenchWidget(make_wb(SOURCE, assemble=False))
    wd.buttons["step_kvm_run"].click()  # nothing assembled yet
    assert "assemble the program first" in wd.html["errors"].value
    wd.editor.value = "mov ax,\nhlt"
    wd.buttons["assemble"].click()
    assert "assembler (line 1)" in wd.html["errors"].value
    assert "kvmlab-error" in wd.html["listing"].value

    def broken() -> None:
        raise KeyError("a listener's bug")

    wd.model.listeners.append(broken)
    wd.model.clear_errors()
    wd.editor.value = SOURCE
    wd.buttons["assemble"].click()
    assert "KeyError" in wd.html["errors"].value


def test_mode_serial_input_and_run_stop(make_wb: Make) -> None:
    wd = WorkbenchWidget(make_wb("l: jmp l\n", assemble=False))
    wd.mode.value = "protected"
    assert wd.model.mode == "protected"
    wd.buttons["assemble"].click()
    assert wd.model.cpu_mode_bits() == "32"
    wd.serial_in.value = "hi"
    wd._do("serial_input")
    assert wd.model.machine is not None and list(wd.model.machine.serial.rx) == [0x68, 0x69]
    wd.buttons["run"].click()
    assert wd.buttons["assemble"].disabled and not wd.buttons["stop"].disabled
    time.sleep(0.1)
    wd.buttons["stop"].click()
    assert not wd.model.running and not wd.buttons["assemble"].disabled


def test_run_mode_refreshes_at_most_ten_times_a_second(
    make_wb: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    wd = WorkbenchWidget(make_wb("l: jmp l\n"))
    live: list[float] = []
    real = panels.render_all

    def counting(wb: Workbench, names: tuple[str, ...] | None = None) -> dict[str, str]:
        if threading.current_thread().name == "workbench-refresh" and names == panels.LIVE:
            live.append(time.monotonic())
        return real(wb, names)

    monkeypatch.setattr(widget.panels, "render_all", counting)
    wd.buttons["run"].click()
    time.sleep(0.55)
    wd.buttons["stop"].click()
    assert 2 <= len(live) <= 7  # about 5 in 0.55 s
    assert min(b - a for a, b in itertools.pairwise(live)) >= 0.09
