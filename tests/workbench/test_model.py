"""The Workbench model driven without a browser: every action and what each panel reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from kvmlab.uapi import KVM_GET_REGS, KVM_GET_SREGS, kvm_regs, kvm_sregs
from kvmlab.vmm import MmioDevice
from kvmlab.workbench import Workbench, model

HELLO = """\
mov dx, 0x3f8
mov al, 'H'
out dx, al
mov byte ptr [0x2000], 0x41
in al, 0xe9
mov al, 'i'
out dx, al
hlt
"""
Make = Callable[..., Workbench]


def kernel_state(wb: Workbench) -> tuple[Any, ...]:
    """Registers as KVM reports them, RAM, devices' output, the log and the view."""
    m = wb.machine
    assert m is not None
    cpu = m.cpus[0]
    regs, sregs = kvm_regs(), kvm_sregs()
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_REGS, regs)
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_SREGS, sregs)
    return (
        bytes(regs),
        bytes(sregs),
        bytes(m.ram),
        wb.serial_text(),
        m.exit_log.reasons(),
        m.state,
        wb.view.regs,
        wb.view.run_area[:0x200],
        dict(wb.view.ram_changed),
    )


def test_assemble_shows_listing_and_boots(make_wb: Make) -> None:
    wb = make_wb(HELLO)
    rows = wb.listing()
    assert rows[0][:4] == (1, "mov dx, 0x3f8", 0x1000, bytes.fromhex("baf803"))
    assert wb.current_line() == 1
    assert wb.linear_rip() == 0x1000
    assert wb.memory_map()[0] == ("slot 0", 0, model.RAM_SIZE, "RAM")
    assert ("port", 0x3F8, 8, "serial") in wb.memory_map()


def test_assembler_error_is_kept_with_its_line(make_wb: Make) -> None:
    wb = make_wb("nop\nmov ax, bogus_label\nhlt", assemble=False)
    assert not wb.assemble()
    assert wb.errors[-1].source == "assembler"
    assert wb.errors[-1].line == 2
    assert "bogus_label" in wb.errors[-1].message
    assert wb.machine is None
    with pytest.raises(RuntimeError, match="assemble"):
        wb.step_kvm_run()


def test_step_kvm_run_decodes_the_io_exit(make_wb: Make) -> None:
    wb = make_wb(HELLO)
    wb.step_kvm_run()
    run = wb.kvm_run()
    assert run is not None
    assert (run.reason_name, run.member) == ("IO", "io")
    fields = {f.name: (f.offset, f.value) for f in run.member_fields}
    assert fields["io.port"] == (0x22, 0x3F8)  # kvm_run + 32 (the union) + 2
    assert fields["io.direction"][1] == 1  # KVM_EXIT_IO_OUT
    assert run.data_offset == 0x1000 and run.data == b"H"
    assert "exit_reason" in run.changed and "io.port" in run.changed
    changed = {name for name, _, c in wb.registers() if c}
    assert {"rax", "rdx", "rip"} <= changed
    assert wb.serial_text() == "H"
    assert wb.exit_counts() == {"IO": 1}
    for _ in range(4):
        wb.step_kvm_run()
    assert wb.serial_text() == "Hi"
    assert wb.exit_counts() == {"IO": 3, "HLT": 1}
    assert [r.reason for r in wb.exit_timeline()] == ["IO", "IO", "IO", "HLT"]
    assert wb.machine is not None and wb.machine.ram[0x2000] == 0x41


def test_memory_panel_marks_the_bytes_the_guest_wrote(make_wb: Make) -> None:
    wb = make_wb(HELLO)
    wb.step_kvm_run()  # OUT 'H'
    wb.step_kvm_run()  # the store, then IN 0xe9
    assert wb.changed_ranges() == [(0x2000, 1)]
    rows = wb.memory(0x2000, 16)
    assert rows[0][1][0] == 0x41 and rows[0][2] == {0}
    wb.back()
    assert wb.machine is not None and wb.machine.ram[0x2000] == 0


def test_step_instruction_single_steps_through_guest_debug(make_wb: Make) -> None:
    wb = make_wb(HELLO)
    wb.step_instruction()
    run = wb.kvm_run()
    assert run is not None and run.reason_name == "DEBUG"
    assert {f.name: f.value for f in run.member_fields}["debug.arch.exception"] == 1
    assert wb.linear_rip() == 0x1003 and wb.current_line() == 2
    assert "KVM_SET_GUEST_DEBUG" in wb.view.trace or wb.backend == "host"
    insns = wb.disassembly()
    current = [(i.mnemonic, line) for i, cur, line in insns if cur]
    assert current == [("mov", 2)]


def test_back_restores_every_state_exactly(make_wb: Make) -> None:
    wb = make_wb(HELLO)
    states = [kernel_state(wb)]
    actions = ["step_kvm_run", "step_instruction", "step_kvm_run", "step_instruction"]
    actions += ["step_kvm_run", "reset", "step_kvm_run", "step_kvm_run", "step_kvm_run"]
    for action in actions:
        getattr(wb, action)()
        states.append(kernel_state(wb))
    assert not wb.errors
    for expected in reversed(states[:-1]):
        assert wb.back()
        assert kernel_state(wb) == expected
    assert not wb.back()
    for action, expected in zip(actions, states[1:], strict=True):  # the same path again
        getattr(wb, action)()
        assert kernel_state(wb)[:6] == expected[:6]


def test_back_after_an_io_exit_does_not_repeat_its_output(make_wb: Make) -> None:
    wb = make_wb(HELLO)
    wb.step_kvm_run()
    wb.step_kvm_run()
    wb.step_kvm_run()
    assert wb.serial_text() == "Hi"
    wb.back()
    wb.back()
    assert wb.serial_text() == "H"
    wb.run()
    assert wb.wait(5)
    assert wb.serial_text() == "Hi"
    assert wb.machine is not None and wb.machine.cpus[0].halted


def test_serial_input_reaches_the_guest_and_back_untypes_it(make_wb: Make) -> None:
    source = "mov dx, 0x3fd\nwait: in al, dx\ntest al, 1\njz wait\n"
    source += "mov dx, 0x3f8\nin al, dx\nout dx, al\nhlt\n"  # echo one byte from COM1
    wb = make_wb(source)
    wb.serial_input("Z")
    wb.run()
    assert wb.wait(5)
    assert wb.serial_text() == "Z"
    wb.back()  # the run
    wb.back()  # the input
    assert wb.machine is not None and not wb.machine.serial.rx
    wb.run()
    time.sleep(0.2)
    assert wb.running  # polls forever: nothing typed
    assert wb.stop()
    assert wb.serial_text() == ""


def test_run_and_stop_a_runaway_guest(make_wb: Make) -> None:
    wb = make_wb("spin: jmp spin\n")
    t = time.monotonic()
    wb.run()
    time.sleep(0.1)
    assert wb.running
    assert wb.stop()
    assert not wb.running and time.monotonic() - t < 3
    assert wb.linear_rip() == 0x1000
    wb.step_instruction()  # the machine steps again after a Run
    run = wb.kvm_run()
    assert run is not None and run.reason_name == "DEBUG"
    assert not wb.errors


def test_run_time_limit_and_step_timeout(make_wb: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    wb = make_wb("spin: jmp spin\n")
    wb.run(timeout=0.2)
    assert wb.wait(3)
    assert "Run stopped after 0.2 s" in str(wb.errors[-1])
    monkeypatch.setattr(model, "STEP_TIMEOUT", 0.2)
    wb.step_kvm_run()
    assert "kicked" in str(wb.errors[-1])
    assert wb.exit_timeline()[-1].reason == "INTR"


def test_hardware_breakpoint_stops_run_and_steps_over(make_wb: Make) -> None:
    wb = make_wb("mov cx, 3\nl: inc ax\nloop l\nhlt\n")
    assert wb.toggle_breakpoint(3)
    wb.run()
    assert wb.wait(5)
    run = wb.kvm_run()
    assert run is not None and run.reason_name == "DEBUG"
    assert wb.current_line() == 3
    regs = dict((n, v) for n, v, _ in wb.registers())
    assert regs["rax"] & 0xFFFF == 1
    wb.step_kvm_run()  # steps over the breakpoint, runs to it again
    regs = dict((n, v) for n, v, _ in wb.registers())
    assert regs["rax"] & 0xFFFF == 2 and wb.current_line() == 3
    assert not wb.toggle_breakpoint(3)
    wb.run()
    assert wb.wait(5)
    assert wb.kvm_run().reason_name == "HLT"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no instruction"):
        wb.toggle_breakpoint(99)


@pytest.mark.parametrize(
    ("mode", "source"),
    [
        ("protected", "mov eax, 0x12345678\nout 0x80, eax\nhlt\n"),
        ("long", "mov rax, 0x1234567812345678\nout 0x80, eax\nhlt\n"),
    ],
)
def test_protected_and_long_mode(make_wb: Make, mode: str, source: str) -> None:
    wb = make_wb(source, assemble=False)
    wb.set_mode(mode)
    assert wb.assemble(), wb.errors
    wb.step_kvm_run()
    run = wb.kvm_run()
    assert run is not None and run.data == bytes.fromhex("78563412")
    assert wb.cpu_mode_bits() == ("64" if mode == "long" else "32")
    assert [i.mnemonic for i, _, _ in wb.disassembly()][1:3] == ["out", "hlt"]


def test_guest_errors_are_reported(make_wb: Make) -> None:
    wb = make_wb("mov dx, 0x501\nmov al, 1\nout dx, al\nhlt\n")
    wb.run()
    assert wb.wait(5)
    assert "exit device: code 3" in str(wb.errors[-1])
    wb.step_kvm_run()
    assert "shutdown" in str(wb.errors[-1])
    wb.reset()
    wb.step_kvm_run()
    assert wb.kvm_run().reason_name == "IO"  # type: ignore[union-attr]


def test_a_failing_device_handler_is_reported(make_wb: Make) -> None:
    class Broken(MmioDevice):
        name = "broken"

        def write(self, offset: int, size: int, value: int) -> None:
            raise ZeroDivisionError("device model bug")

    wb = make_wb("mov byte ptr [0xfee0], 1\nhlt\n", ram_size=0xF000)
    assert wb.machine is not None
    wb.machine.mmio.register(0xFEE0, 0x10, Broken())
    wb.step_kvm_run()
    assert wb.errors[-1].source == "handler"
    assert "device model bug" in wb.errors[-1].message


def test_bad_choices_are_refused() -> None:
    wb = Workbench()
    with pytest.raises(ValueError, match="mode"):
        wb.set_mode("virtual-8086")
    with pytest.raises(ValueError, match="backend"):
        wb.set_backend("qemu")
    with pytest.raises(RuntimeError, match="assemble"):
        wb.back()  # nothing to undo before assembling
    wb.close()
