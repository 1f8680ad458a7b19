"""Whole machines running real guest code, on the simulator and on the host's /dev/kvm.

Every test takes the `k` fixture, so it runs once per backend (the host half skips where
/dev/kvm is unusable). Guest programs are in guests.py, with their assembly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import ModuleType

import pytest
from polling import wait_until

from kvmlab.uapi import (
    KVM_GET_REGS,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_SET_GUEST_DEBUG,
    kvm_guest_debug,
    kvm_regs,
)
from kvmlab.vmm import EXCP_DEBUG, EXCP_HLT, EXCP_INTERRUPT, Machine, ScratchDevice

from .guests import (
    DEBUG_EXIT_REAL,
    ECHO_REAL,
    ENTRY,
    HELLO,
    IRQ_GATE,
    IRQ_HANDLER,
    IRQ_HANDLER_CODE,
    IRQ_IDT,
    IRQ_IDTR,
    IRQ_IDTR_BYTES,
    IRQ_MAIN,
    IRQ_VECTOR,
    JUMP_OUTSIDE_RAM,
    LOOP,
    MMIO_BASE,
    MMIO_PROTECTED,
    PORTS_REAL,
    hello_long,
    hello_protected,
    hello_real,
)

MakeMachine = Callable[..., Machine]
HELLO_TEXT = HELLO.rstrip(b"\0").decode()
OUT_80_LOOP = bytes([0xE6, 0x80, 0xEB, 0xFC])  # l: out 0x80, al / jmp l


@pytest.mark.parametrize(
    ("mode", "code"),
    [("real", hello_real()), ("protected", hello_protected()), ("long", hello_long())],
)
def test_a_guest_prints_hello_on_the_serial_port_in_each_cpu_mode(
    make_machine: MakeMachine, mode: str, code: bytes
) -> None:
    m = make_machine().boot(code, mode, ENTRY)
    assert m.run(max_exits=100) == EXCP_HLT
    assert m.serial.text() == HELLO_TEXT
    assert m.exit_log.reasons() == ["IO"] * len(HELLO_TEXT) + ["HLT"]
    assert {(r.address, r.direction, r.size) for r in m.exit_log if r.reason == "IO"} == {
        (0x3F8, "out", 1)
    }


# --- input ---------------------------------------------------------------------------------------


def test_the_guest_reads_what_was_fed_into_the_uart(make_machine: MakeMachine) -> None:
    m = make_machine().boot(ECHO_REAL, "real", ENTRY)
    m.serial.feed(b"hi\n")
    assert m.run(max_exits=200) == EXCP_HLT
    assert m.serial.text() == "hi\n"
    reads = [r.data for r in m.exit_log if r.direction == "in" and r.address == 0x3F8]
    assert reads == [b"h", b"i", b"\n"]


def test_typing_reaches_a_guest_that_polls_on_its_vcpu_thread(make_machine: MakeMachine) -> None:
    m = make_machine().boot(ECHO_REAL, "real", ENTRY)
    m.start()
    assert not m.wait(0.05)  # polling LSR: busy, not halted
    m.serial.feed(b"ok\n")
    assert m.wait(5)
    assert m.serial.text() == "ok\n"
    assert m.cpus[0].halted


# --- stopping ------------------------------------------------------------------------------------


def test_the_exit_device_stops_a_synchronous_run_with_qemus_exit_code(
    make_machine: MakeMachine,
) -> None:
    m = make_machine().boot(DEBUG_EXIT_REAL, "real", ENTRY)
    assert m.run(max_exits=10) == EXCP_INTERRUPT
    assert (m.state, m.exit_code, m.debug_exit.value) == ("shutdown", 0x21, 0x10)
    out, intr = m.exit_log
    assert (out.reason, out.address, out.data) == ("IO", 0x501, b"\x10")
    assert intr.reason == "INTR"  # the kick that took the vCPU out; HLT never ran
    with pytest.raises(RuntimeError, match="shutdown"):
        m.run()


def test_the_exit_device_stops_vcpu_threads(make_machine: MakeMachine) -> None:
    m = make_machine().boot(DEBUG_EXIT_REAL, "real", ENTRY)
    m.start()
    assert m.wait(5)
    assert (m.state, m.exit_code) == ("shutdown", 0x21)
    assert wait_until(lambda: m.cpus[0].stopped)
    assert "HLT" not in m.exit_log.reasons()


def test_stop_ends_a_vcpu_thread_spinning_in_jmp_dollar_within_a_second(
    make_machine: MakeMachine,
) -> None:
    m = make_machine().boot(LOOP, "real", ENTRY)
    m.start()
    assert not m.wait(0.1)
    started = time.monotonic()
    assert m.stop()
    assert time.monotonic() - started < 1.0
    assert m.state == "stopped"
    assert not any(t.is_alive() for t in threading.enumerate() if t.name == "CPU 0/KVM")


def test_stop_from_another_thread_ends_a_synchronous_run_of_jmp_dollar(
    make_machine: MakeMachine,
) -> None:
    m = make_machine().boot(LOOP, "long", ENTRY)
    stopper = threading.Timer(0.2, m.stop)
    stopper.start()
    started = time.monotonic()
    assert m.run() == EXCP_INTERRUPT
    assert time.monotonic() - started < 1.2
    stopper.join()
    assert m.exit_log.reasons() == ["INTR"]


def test_pause_holds_every_vcpu_outside_kvm_run_and_resume_lets_it_go_on(
    make_machine: MakeMachine,
) -> None:
    m = make_machine(cpus=2)
    m.load(OUT_80_LOOP, ENTRY)
    m.setup_cpu(0, "real", ENTRY)
    m.setup_cpu(1, "protected", ENTRY)
    m.start()
    assert wait_until(lambda: {r.cpu for r in m.exit_log} == {0, 1})
    assert m.pause()
    assert m.state == "paused"
    assert all(c.stopped for c in m.cpus)
    paused_at = len(m.exit_log) + m.exit_log.dropped
    time.sleep(0.05)
    assert len(m.exit_log) + m.exit_log.dropped == paused_at
    m.resume()
    assert wait_until(lambda: len(m.exit_log) + m.exit_log.dropped > paused_at + 10)
    assert m.stop()


# --- several vCPUs -------------------------------------------------------------------------------


def test_two_vcpus_print_from_their_own_threads(make_machine: MakeMachine) -> None:
    m = make_machine(cpus=2)
    messages = {0: b"from cpu 0\n", 1: b"from cpu 1\n"}
    m.load(hello_real(messages[0] + b"\0", 0x1000), 0x1000)
    m.load(hello_real(messages[1] + b"\0", 0x2000), 0x2000)
    m.setup_cpu(0, "real", 0x1000)
    m.setup_cpu(1, "real", 0x2000)
    printers: set[str] = set()
    m.serial.on_output = lambda _: printers.add(threading.current_thread().name)
    m.start()
    assert m.wait(5)
    assert all(c.halted for c in m.cpus)
    for index, message in messages.items():
        sent = b"".join(r.data for r in m.exit_log if r.cpu == index and r.reason == "IO")
        assert sent == message
    assert sorted(m.serial.output) == sorted(messages[0] + messages[1])
    assert printers == {"CPU 0/KVM", "CPU 1/KVM"}


# --- the exit log and single steps ---------------------------------------------------------------


def test_the_exit_log_records_each_port_access_in_order(
    make_machine: MakeMachine, k: ModuleType
) -> None:
    m = make_machine().boot(PORTS_REAL, "real", ENTRY)
    assert m.run() == EXCP_HLT
    out, in_, out80, hlt = m.exit_log
    assert [r.seq for r in m.exit_log] == [0, 1, 2, 3]
    assert out.time <= in_.time <= out80.time <= hlt.time
    assert (out.reason, out.address, out.direction, out.size, out.count, out.data) == (
        "IO",
        0xE9,
        "out",
        1,
        1,
        b"A",
    )
    assert (in_.address, in_.direction, in_.data, in_.rip) == (0xE9, "in", b"\xe9", 0x1004)
    assert (out80.address, out80.direction, out80.data) == (0x80, "out", b"\xe9")
    assert (hlt.reason, hlt.rip, hlt.address, hlt.data) == ("HLT", 0x1009, None, b"")
    # rip at an OUT exit: on the OUT with VMX and the simulator, already past it on PVM
    expected = {0x1002} if k.name == "sim" else {0x1002, 0x1004}
    assert out.rip in expected
    assert m.debugcon.text() == "A"


def test_step_runs_one_kvm_run_and_its_exit_at_a_time(make_machine: MakeMachine) -> None:
    m = make_machine().boot(PORTS_REAL, "real", ENTRY)
    steps = [m.step() for _ in range(5)]
    assert [(s.reason, s.address) if s else None for s in steps] == [
        ("IO", 0xE9),
        ("IO", 0xE9),
        ("IO", 0x80),
        ("HLT", None),
        None,  # halted: nothing to run
    ]


# --- reset ---------------------------------------------------------------------------------------


def test_reset_puts_the_vcpu_back_at_its_entry_with_its_images_reloaded(
    make_machine: MakeMachine,
) -> None:
    m = make_machine().boot(hello_long(), "long", ENTRY)
    assert m.run() == EXCP_HLT
    m.memory_write(ENTRY, b"\xf4")  # the guest's code is overwritten with a HLT ...
    m.reset()  # ... and loaded again
    assert m.run() == EXCP_HLT
    assert m.serial.text() == HELLO_TEXT * 2
    assert m.resets == 1


def test_reset_of_a_running_machine_pauses_resets_and_resumes_it(
    make_machine: MakeMachine,
) -> None:
    m = make_machine().boot(hello_real(), "real", ENTRY)
    m.start()
    assert m.wait(5)
    m.reset()
    assert m.state == "running"
    assert wait_until(lambda: m.serial.text() == HELLO_TEXT * 2)
    assert m.wait(5)


# --- MMIO, errors, interrupts --------------------------------------------------------------------


def test_mmio_accesses_outside_ram_reach_the_scratch_device(make_machine: MakeMachine) -> None:
    m = make_machine().boot(MMIO_PROTECTED, "protected", ENTRY)
    dev = m.mmio.register(MMIO_BASE, 0x100, ScratchDevice())
    assert isinstance(dev, ScratchDevice)
    dev.regs[0:4] = (0x12345678).to_bytes(4, "little")
    assert m.run(max_exits=10) == EXCP_HLT
    assert dev.accesses == [("read", 0, 4, 0x12345678), ("write", 4, 4, 0x12345678)]
    read, write, _ = m.exit_log
    assert (read.reason, read.address, read.direction, read.data) == (
        "MMIO",
        MMIO_BASE,
        "read",
        b"\x78\x56\x34\x12",
    )
    assert (write.address, write.direction, write.size) == (MMIO_BASE + 4, "write", 4)


def test_code_outside_ram_stops_the_machine_with_a_register_report(
    make_machine: MakeMachine,
) -> None:
    m = make_machine().boot(JUMP_OUTSIDE_RAM, "protected", ENTRY)
    assert m.run(max_exits=10) == -1
    assert m.state == "internal-error"
    last = m.exit_log[-1]
    assert last.reason == "INTERNAL_ERROR"
    assert last.detail.startswith("KVM internal error. Suberror: 1 (emulation failure)")
    assert "RIP=0000000000300000" in last.detail
    assert "Code=(not in guest RAM)" in last.detail
    assert m.cpus[0].last_error == last.detail


def irq_machine(make_machine: MakeMachine) -> Machine:
    """Long mode, IDT with a COM1 handler at vector 0x24; the guest enables RDI and halts."""
    m = make_machine().boot(IRQ_MAIN, "long", ENTRY)
    m.load(IRQ_HANDLER_CODE, IRQ_HANDLER)
    m.load(IRQ_IDTR_BYTES, IRQ_IDTR)
    m.load(IRQ_GATE, IRQ_IDT + 16 * IRQ_VECTOR)
    return m


def test_a_uart_interrupt_is_injected_and_handled_by_the_guest(make_machine: MakeMachine) -> None:
    m = irq_machine(make_machine)
    m.serial.feed(b"x")  # waiting before the guest enables the interrupt
    assert m.run(max_exits=50) == EXCP_HLT
    assert m.debugcon.text() == "x"
    assert m.cpus[0].halted


def test_typing_wakes_a_halted_vcpu_thread_through_an_interrupt(make_machine: MakeMachine) -> None:
    m = irq_machine(make_machine)
    m.start()
    assert m.wait(5)  # enabled the interrupt, halted
    m.serial.feed(b"yz")
    assert wait_until(lambda: m.debugcon.text() == "yz")
    assert m.wait(5)


# --- debug stops and the register copy ----------------------------------------------------------


def test_boot_puts_the_registers_into_kvm_at_once(make_machine: MakeMachine) -> None:
    m = make_machine().boot(b"\xf4", "real", 0x1000)
    regs = kvm_regs()
    m.k.ioctl(m.cpus[0].kvm_fd, KVM_GET_REGS, regs)
    assert (regs.rip, m.cpus[0].vcpu_dirty) == (0x1000, False)


def test_vm_start_continues_after_a_debug_stop(make_machine: MakeMachine) -> None:
    m = make_machine().boot(b"\x90\x90\xf4", "real", 0x1000)  # nop; nop; hlt
    debug = kvm_guest_debug(control=KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
    m.k.ioctl(m.cpus[0].kvm_fd, KVM_SET_GUEST_DEBUG, debug)
    assert m.run() == EXCP_DEBUG and m.state == "debug"
    with pytest.raises(RuntimeError, match="the machine is debug"):
        m.run()
    m.vm_start()
    m.k.ioctl(m.cpus[0].kvm_fd, KVM_SET_GUEST_DEBUG, kvm_guest_debug())
    assert (m.run(), m.state) == (EXCP_HLT, "created")
    with pytest.raises(RuntimeError, match="cannot continue a machine that is created"):
        m.vm_start()
