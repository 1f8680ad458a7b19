"""kvm_cpu_exec against a scripted face: each KVM_RUN "exits" with a constructed kvm_run.

No guest runs here. This pins the loop's decisions exit by exit (which device is called, what
goes back into the kvm_run page, what is returned and logged), including paths the backends
cannot be made to take on demand (SHUTDOWN, UNKNOWN, DEBUG, EAGAIN, a failed injection).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from kvmlab.uapi import (
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_UNKNOWN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERRUPT,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    kvm_regs,
    kvm_run,
    kvm_sregs,
)
from kvmlab.vmm import EXCP_DEBUG, EXCP_HLT, EXCP_INTERRUPT, CPUState, kvm_cpu_exec
from kvmlab.vmm.cpu import CPU_INTERRUPT_HARD
from kvmlab.vmm.exitlog import ExitLog
from kvmlab.vmm.hw import DebugCon, ScratchDevice, Serial16550
from kvmlab.vmm.memory import Device, IoBus, MmioBus

PIO_OFFSET = 0x1000
RIP = 0x1234
NAMES = {
    KVM_RUN: "KVM_RUN",
    KVM_GET_REGS: "KVM_GET_REGS",
    KVM_GET_SREGS: "KVM_GET_SREGS",
    KVM_SET_REGS: "KVM_SET_REGS",
    KVM_SET_SREGS: "KVM_SET_SREGS",
    KVM_INTERRUPT: "KVM_INTERRUPT",
}
Exit = Callable[[Any, mmap.mmap], None] | int  # fill kvm_run, or an errno for KVM_RUN


class FakeFace:
    """A syscall face whose KVM_RUN plays `script`; it records every ioctl by name."""

    name = "fake"

    def __init__(self) -> None:
        self.script: list[Exit] = []
        self.calls: list[str] = []
        self.immediate_exit_at_run: list[int] = []
        self.injected: list[int] = []
        self.interrupt_errno: int | None = None
        self.regs = kvm_regs(rip=RIP, rax=0x42, rflags=0x202)
        self.sregs = kvm_sregs()
        self.cpu: CPUState

    def ioctl(self, fd: int, request: int, arg: Any = 0, mutate_flag: bool = True) -> int:
        self.calls.append(NAMES[request])
        if request == KVM_RUN:
            run = self.cpu.kvm_run
            self.immediate_exit_at_run.append(run.immediate_exit)
            step = self.script.pop(0)
            if isinstance(step, int):
                raise OSError(step, os.strerror(step))
            step(run, self.cpu.kvm_run_map)
        elif request in (KVM_GET_REGS, KVM_GET_SREGS):
            src = self.regs if request == KVM_GET_REGS else self.sregs
            ctypes.memmove(ctypes.addressof(arg), ctypes.addressof(src), ctypes.sizeof(src))
        elif request == KVM_INTERRUPT:
            if self.interrupt_errno is not None:
                raise OSError(self.interrupt_errno, os.strerror(self.interrupt_errno))
            self.injected.append(arg.irq)
        return 0


class FakeBoard:
    """The machine around the CPU: buses, log, a vector queue, a reset flag, some RAM."""

    def __init__(self) -> None:
        self.bql = threading.RLock()
        self.io = IoBus()
        self.mmio = MmioBus()
        self.exit_log = ExitLog()
        self.vectors: list[int] = []
        self.resets = 0
        self.ram = bytearray(0x10000)

    def cpu_get_pic_interrupt(self, cpu: CPUState) -> int:
        vector = self.vectors.pop(0) if self.vectors else -1
        if not self.vectors:
            cpu.interrupt_request &= ~CPU_INTERRUPT_HARD
        return vector

    def qemu_system_reset_request(self) -> None:
        self.resets += 1

    def memory_read(self, gpa: int, size: int) -> bytes | None:
        return bytes(self.ram[gpa : gpa + size]) if gpa + size <= len(self.ram) else None


@pytest.fixture
def face() -> FakeFace:
    return FakeFace()


@pytest.fixture
def board() -> FakeBoard:
    return FakeBoard()


@pytest.fixture
def cpu(face: FakeFace, board: FakeBoard) -> CPUState:
    run_map = mmap.mmap(-1, 3 * mmap.PAGESIZE)
    c = CPUState(0, face, 99, run_map, kvm_run.from_buffer(run_map), board)
    face.cpu = c
    return c


def exec_(cpu: CPUState, max_runs: int | None = None) -> int:
    with cpu.board.bql:
        return kvm_cpu_exec(cpu, max_runs)


# --- constructed exits ---------------------------------------------------------------------------


def io(direction: int, port: int, size: int, count: int = 1, data: bytes = b"") -> Exit:
    def fill(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = KVM_EXIT_IO
        run.io.direction, run.io.port, run.io.size, run.io.count = direction, port, size, count
        run.io.data_offset = PIO_OFFSET
        page[PIO_OFFSET : PIO_OFFSET + size * count] = data or bytes(size * count)

    return fill


def mmio(addr: int, length: int, is_write: bool, data: bytes = b"") -> Exit:
    def fill(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = KVM_EXIT_MMIO
        run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = addr, length, is_write
        run.mmio.data[:] = list(data.ljust(8, b"\0"))

    return fill


def plain(reason: int, ready: int = 0, if_flag: int = 0) -> Exit:
    def fill(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = reason
        run.ready_for_interrupt_injection, run.if_flag = ready, if_flag

    return fill


HLT = plain(KVM_EXIT_HLT)


# --- IO and MMIO ---------------------------------------------------------------------------------


def test_an_out_goes_to_the_port_device_and_is_logged_with_port_data_and_rip(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    uart = board.io.register(0x3F8, 8, Serial16550())
    face.script = [io(KVM_EXIT_IO_OUT, 0x3F8, 1, data=b"A"), HLT]
    assert exec_(cpu) == EXCP_HLT
    assert uart.output == b"A"
    first, last = board.exit_log
    assert (first.reason, first.address, first.direction, first.size, first.count) == (
        "IO",
        0x3F8,
        "out",
        1,
        1,
    )
    assert (first.data, first.rip, first.cpu, first.seq) == (b"A", RIP, 0, 0)
    assert (last.reason, last.seq) == ("HLT", 1)
    assert last.time >= first.time


def test_every_element_of_a_string_out_reaches_the_device_in_order(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    class Words(Device):
        def __init__(self) -> None:
            self.words: list[int] = []

        def write(self, offset: int, size: int, value: int) -> None:
            self.words.append(value)

    dev = board.io.register(0x100, 2, Words())
    face.script = [io(KVM_EXIT_IO_OUT, 0x100, 2, 3, bytes.fromhex("0100 0200 0300")), HLT]
    exec_(cpu)
    assert dev.words == [0x0001, 0x0002, 0x0003]


def test_an_in_is_answered_in_the_pio_page_for_every_element(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    board.io.register(0xE9, 1, DebugCon())
    face.script = [io(KVM_EXIT_IO_IN, 0xE9, 1, 2), io(KVM_EXIT_IO_IN, 0x80, 2), HLT]
    exec_(cpu)
    assert board.exit_log[0].data == b"\xe9\xe9"
    assert board.exit_log[0].direction == "in"
    assert board.exit_log[1].data == b"\xff\xff"  # nobody at port 0x80
    assert cpu.kvm_run_map[PIO_OFFSET : PIO_OFFSET + 2] == b"\xff\xff"


def test_an_mmio_write_reaches_the_device_and_a_read_fills_run_mmio_data(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    dev = board.mmio.register(0xD0000000, 0x100, ScratchDevice())
    face.script = [
        mmio(0xD0000010, 4, True, b"\x78\x56\x34\x12"),
        mmio(0xD0000012, 2, False),
        HLT,
    ]
    assert exec_(cpu) == EXCP_HLT
    assert dev.accesses == [("write", 0x10, 4, 0x12345678), ("read", 0x12, 2, 0x1234)]
    assert bytes(cpu.kvm_run.mmio.data[:2]) == b"\x34\x12"
    write, read, _ = board.exit_log
    assert (write.reason, write.address, write.direction, write.data) == (
        "MMIO",
        0xD0000010,
        "write",
        b"\x78\x56\x34\x12",
    )
    assert (read.direction, read.size, read.data) == ("read", 2, b"\x34\x12")


# --- exits that return to the vCPU thread --------------------------------------------------------


def test_hlt_halts_the_vcpu_and_a_halted_vcpu_does_not_enter_kvm_run_again(
    cpu: CPUState, face: FakeFace
) -> None:
    face.script = [HLT]
    assert exec_(cpu) == EXCP_HLT
    assert cpu.halted
    assert exec_(cpu) == EXCP_HLT
    assert face.calls.count("KVM_RUN") == 1


def test_hlt_with_an_interrupt_the_guest_can_take_keeps_running(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    board.vectors = [0x24]
    cpu.interrupt_request = CPU_INTERRUPT_HARD
    face.script = [plain(KVM_EXIT_HLT, ready=1, if_flag=1), HLT]
    assert exec_(cpu) == EXCP_HLT
    assert face.injected == [0x24]
    assert face.calls.count("KVM_RUN") == 2


def test_an_interrupt_window_exit_returns_to_the_thread(cpu: CPUState, face: FakeFace) -> None:
    face.script = [plain(KVM_EXIT_IRQ_WINDOW_OPEN)]
    assert exec_(cpu) == EXCP_INTERRUPT


def test_shutdown_requests_a_machine_reset(cpu: CPUState, face: FakeFace, board: FakeBoard) -> None:
    face.script = [plain(KVM_EXIT_SHUTDOWN)]
    assert exec_(cpu) == EXCP_INTERRUPT
    assert board.resets == 1
    assert board.exit_log.reasons() == ["SHUTDOWN"]


def test_a_debug_exit_returns_excp_debug(cpu: CPUState, face: FakeFace) -> None:
    face.script = [plain(KVM_EXIT_DEBUG)]
    assert exec_(cpu) == EXCP_DEBUG


# --- fatal exits ---------------------------------------------------------------------------------


def test_an_unknown_exit_stops_with_the_hardware_reason_and_the_registers(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    def unknown(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = KVM_EXIT_UNKNOWN
        run.hw.hardware_exit_reason = 0x31

    face.script = [unknown]
    assert exec_(cpu) == -1
    assert "KVM: unknown exit, hardware reason 0x31" in cpu.last_error
    assert f"RIP={RIP:016x}" in cpu.last_error
    assert "RAX=0000000000000042" in cpu.last_error
    assert board.exit_log[0].detail == cpu.last_error


def test_an_emulation_failure_reports_the_instruction_bytes_and_the_code_at_rip(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    board.ram[RIP : RIP + 2] = b"\x0f\x0b"  # ud2

    def failure(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR
        run.internal.suberror = KVM_INTERNAL_ERROR_EMULATION
        run.internal.ndata = 3
        run.emulation_failure.flags = 1
        run.emulation_failure.insn_size = 2
        run.emulation_failure.insn_bytes[:2] = [0x0F, 0x0B]

    face.script = [failure]
    assert exec_(cpu) == -1
    report = cpu.last_error
    assert report.startswith("KVM internal error. Suberror: 1 (emulation failure)")
    assert "extra data[0]: 0x0000000000000001" in report
    assert "instruction bytes: 0f 0b" in report
    assert "Code=0f 0b 00" in report


def test_an_exception_exit_is_fatal(cpu: CPUState, face: FakeFace) -> None:
    def ud(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = KVM_EXIT_EXCEPTION
        run.ex.exception = 6

    face.script = [ud]
    assert exec_(cpu) == -1
    assert cpu.last_error.startswith("KVM: exception 6 exit")


# --- KVM_RUN failing -----------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EINTR, errno.EAGAIN])
def test_eintr_and_eagain_return_excp_interrupt_and_clear_immediate_exit(
    cpu: CPUState, face: FakeFace, board: FakeBoard, err: int
) -> None:
    cpu.kvm_run.immediate_exit = 1
    face.script = [err]
    assert exec_(cpu) == EXCP_INTERRUPT
    assert cpu.kvm_run.immediate_exit == 0
    assert (board.exit_log[0].reason, board.exit_log[0].detail) == ("INTR", errno.errorcode[err])


def test_any_other_errno_from_kvm_run_stops_the_vcpu(cpu: CPUState, face: FakeFace) -> None:
    face.script = [errno.EFAULT]
    assert exec_(cpu) == -1
    assert cpu.last_error == "kvm run failed: Bad address"


# --- before KVM_RUN ------------------------------------------------------------------------------


def test_an_exit_request_enters_kvm_run_with_immediate_exit_and_is_then_cleared(
    cpu: CPUState, face: FakeFace
) -> None:
    cpu.exit_request = True
    face.script = [errno.EINTR]
    assert exec_(cpu) == EXCP_INTERRUPT
    assert face.immediate_exit_at_run == [1]
    assert not cpu.exit_request


def test_a_pending_interrupt_is_injected_when_kvm_says_the_guest_is_ready(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    board.vectors = [0x24]
    cpu.interrupt_request, cpu.if_flag = CPU_INTERRUPT_HARD, True
    cpu.kvm_run.ready_for_interrupt_injection = 1
    face.script = [HLT]
    exec_(cpu)
    assert face.calls[:2] == ["KVM_INTERRUPT", "KVM_RUN"]
    assert face.injected == [0x24]
    assert not cpu.interrupt_request


def test_an_interrupt_the_guest_cannot_take_yet_requests_an_interrupt_window(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    board.vectors = [0x24]
    cpu.interrupt_request = CPU_INTERRUPT_HARD
    seen: list[int] = []

    def window(run: Any, page: mmap.mmap) -> None:
        seen.append(run.request_interrupt_window)
        run.exit_reason = KVM_EXIT_IRQ_WINDOW_OPEN
        run.ready_for_interrupt_injection = run.if_flag = 1

    face.script = [window, HLT]
    assert exec_(cpu) == EXCP_INTERRUPT
    assert (seen, face.injected) == ([1], [])
    exec_(cpu)
    assert face.injected == [0x24]
    assert cpu.kvm_run.request_interrupt_window == 0


def test_a_failed_injection_is_reported_and_the_interrupt_is_lost(
    cpu: CPUState, face: FakeFace, board: FakeBoard, caplog: pytest.LogCaptureFixture
) -> None:
    board.vectors = [0x24]
    cpu.interrupt_request, cpu.if_flag = CPU_INTERRUPT_HARD, True
    cpu.kvm_run.ready_for_interrupt_injection = 1
    face.interrupt_errno = errno.EINVAL
    face.script = [HLT]
    with caplog.at_level(logging.WARNING, logger="kvmlab.vmm"):
        assert exec_(cpu) == EXCP_HLT
    assert "KVM: injection failed, interrupt lost (Invalid argument)" in caplog.text
    assert not cpu.interrupt_request


def test_dirty_registers_are_put_sregs_first_before_kvm_run(cpu: CPUState, face: FakeFace) -> None:
    cpu.regs.rip = 0x7C00
    cpu.vcpu_dirty = True
    face.script = [HLT]
    exec_(cpu)
    assert face.calls[:3] == ["KVM_SET_SREGS", "KVM_SET_REGS", "KVM_RUN"]
    assert not cpu.vcpu_dirty


def test_after_kvm_run_if_cr8_and_apic_base_are_kept(cpu: CPUState, face: FakeFace) -> None:
    def fill(run: Any, page: mmap.mmap) -> None:
        run.exit_reason = KVM_EXIT_HLT
        run.if_flag, run.cr8, run.apic_base = 1, 5, 0xFEE00900

    face.script = [fill]
    exec_(cpu)
    assert (cpu.if_flag, cpu.cr8, cpu.apic_base) == (True, 5, 0xFEE00900)


def test_max_runs_returns_after_that_many_handled_exits(cpu: CPUState, face: FakeFace) -> None:
    face.script = [io(KVM_EXIT_IO_OUT, 0x80, 1)] * 3
    assert exec_(cpu, max_runs=2) == EXCP_INTERRUPT
    assert face.calls.count("KVM_RUN") == 2


def test_the_bql_is_released_exactly_around_kvm_run(
    cpu: CPUState, face: FakeFace, board: FakeBoard
) -> None:
    held: list[bool] = []

    def try_bql_from_another_thread() -> None:
        def attempt() -> None:
            got = board.bql.acquire(timeout=0.05)
            held.append(got)
            if got:
                board.bql.release()

        other = threading.Thread(target=attempt)
        other.start()
        other.join()

    class Probe(Device):
        def write(self, offset: int, size: int, value: int) -> None:
            try_bql_from_another_thread()

    def probe(run: Any, page: mmap.mmap) -> None:
        try_bql_from_another_thread()
        run.exit_reason = KVM_EXIT_HLT

    board.io.register(0x80, 1, Probe())
    face.script = [io(KVM_EXIT_IO_OUT, 0x80, 1), probe]
    exec_(cpu)
    assert held == [False, True]  # a device runs under the BQL; KVM_RUN runs without it
