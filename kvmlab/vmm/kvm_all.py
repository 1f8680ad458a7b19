"""accel/kvm/kvm-all.c for kvmlab: open KVM, create the VM and its vCPUs, and run a vCPU.

`kvm_cpu_exec` is QEMU's vCPU loop, step for step and name for name, so that a student who
later opens https://gitlab.com/qemu-project/qemu/-/blob/master/accel/kvm/kvm-all.c recognises
every line. Only a syscall face (`kvmlab.sys`, the simulator, or `kvmlab.host`, the real
/dev/kvm) and `kvmlab.uapi` are used: this is a userspace program, not part of the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_API_VERSION,
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_IRQ_INJECT_STATUS,
    KVM_CAP_IRQCHIP,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_UNKNOWN,
    KVM_GET_API_VERSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_RUN,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    kvm_irq_level,
    kvm_run,
    kvm_run_mmio,
    kvm_userspace_memory_region,
)
from kvmlab.vmm import arm, i386
from kvmlab.vmm.cpu import EXCP_HLT, EXCP_INTERRUPT, Board, CPUState
from kvmlab.vmm.memory import Bus, address_space_rw

log = logging.getLogger("kvmlab.vmm")
SIG_IPI = signal.SIGUSR1  # QEMU's kick signal (SIGUSR1 on Linux)
MMIO_DATA_OFFSET = kvm_run.exit.offset + kvm_run_mmio.data.offset  # run->mmio.data in the page
INTERNAL_ERRORS = {1: "emulation failure", 2: "exception during exception delivery"}
INTERNAL_ERRORS |= {3: "unexpected exit during event delivery", 4: "unexpected exit reason"}
SYSTEM_EVENTS = (KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET)  # the generic ones
TARGETS = {"i386": i386, "arm": arm}  # the KVM hooks of each CPU's target (CPUState.target)


def kvm_arch(cpu: CPUState) -> ModuleType:
    """The architecture half of the loop for `cpu`: target/i386/kvm.c or target/arm/kvm.c."""
    return TARGETS[cpu.target]


@dataclass
class KVMState:
    """The /dev/kvm fd, the VM fd and what every vCPU needs from them (QEMU's KVMState)."""

    k: Any  # the syscall face
    fd: int
    vmfd: int
    vcpu_mmap_size: int
    kernel_irqchip: bool = False  # KVM_CREATE_IRQCHIP done: QEMU's kvm_irqchip_in_kernel()
    irq_set_ioctl: int = KVM_IRQ_LINE  # KVM_IRQ_LINE_STATUS where KVM reports delivery


def kvm_init(k: Any, kernel_irqchip: bool = False) -> KVMState:
    """Open /dev/kvm, check the API, create the VM (QEMU's kvm_init, the parts we need) and,
    with `kernel_irqchip`, its interrupt controllers in KVM before any vCPU exists."""
    fd = k.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        version = k.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            raise RuntimeError(f"KVM API version {version} is not supported (want 12)")
        # kicks rely on immediate_exit (QEMU requires this capability too)
        if not k.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT):
            raise RuntimeError("KVM lacks KVM_CAP_IMMEDIATE_EXIT")
        while True:
            try:
                vmfd = k.ioctl(fd, KVM_CREATE_VM, 0)
                break
            except InterruptedError:
                continue
        s = KVMState(k, fd, vmfd, k.ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0))
    except BaseException:
        k.close(fd)
        raise
    if kernel_irqchip:
        try:
            kvm_irqchip_create(s)
        except BaseException:
            k.close(vmfd)
            k.close(fd)
            raise
    return s


def kvm_irqchip_create(s: KVMState) -> None:
    """KVM_CREATE_IRQCHIP: the two 8259s, the IOAPIC and a local APIC for every vCPU created
    after it, all in KVM. Devices then raise lines with kvm_set_irq, never KVM_INTERRUPT, and
    HLT stays in the kernel (QEMU's kvm_irqchip_create; its KVM_SET_GSI_ROUTING is left out:
    KVM's default routing, GSI n to PIC and IOAPIC pin n, is the PC's)."""
    if not s.k.ioctl(s.fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQCHIP):
        raise RuntimeError("KVM lacks KVM_CAP_IRQCHIP: no in-kernel irqchip")
    s.k.ioctl(s.vmfd, KVM_CREATE_IRQCHIP, 0)
    s.kernel_irqchip = True
    if s.k.ioctl(s.fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQ_INJECT_STATUS):
        s.irq_set_ioctl = KVM_IRQ_LINE_STATUS


def kvm_set_irq(s: KVMState, irq: int, level: int) -> int:
    """Set GSI `irq` to `level` in the in-kernel irqchip (KVM_IRQ_LINE). What KVM said: >0
    delivered, 0 coalesced (already pending), <0 masked; always 1 without a status."""
    event = kvm_irq_level(level=level)
    event.irq = irq
    s.k.ioctl(s.vmfd, s.irq_set_ioctl, event)
    return 1 if s.irq_set_ioctl == KVM_IRQ_LINE else int(event.status)


def kvm_set_user_memory_region(s: KVMState, slot: int, gpa: int, size: int, hva: int) -> None:
    """Register host memory at `hva` as guest RAM [gpa, gpa + size) in memory slot `slot`."""
    region = kvm_userspace_memory_region(
        slot=slot, flags=0, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva
    )
    s.k.ioctl(s.vmfd, KVM_SET_USER_MEMORY_REGION, region)


def kvm_init_vcpu(
    s: KVMState, index: int, board: Board, cpu_class: type[CPUState] = CPUState, **props: Any
) -> CPUState:
    """KVM_CREATE_VCPU, map its kvm_run, let the architecture set the vCPU up
    (kvm_arch_init_vcpu) and read its reset registers. `props` are the CPU's properties."""
    fd = s.k.ioctl(s.vmfd, KVM_CREATE_VCPU, index)
    run_map = s.k.mmap(fd, s.vcpu_mmap_size)
    run = cpu_class.kvm_run_type.from_buffer(run_map)
    cpu = cpu_class(
        index, s.k, fd, run_map, run, board, irqchip_in_kernel=s.kernel_irqchip, **props
    )
    kvm_arch(cpu).kvm_arch_init_vcpu(cpu)
    return cpu


def kvm_destroy_vcpu(cpu: CPUState) -> None:
    """Unmap kvm_run and close the vCPU fd (KVM itself keeps the vCPU until the VM goes)."""
    cpu.kvm_run = None
    cpu.kvm_run_map.close()
    cpu.k.close(cpu.kvm_fd)


# --- kicks ------------------------------------------------------------------------------------


def _kvm_ipi_signal(signum: int, frame: object) -> None:
    """SIG_IPI's handler does nothing: the signal's arrival is what ends KVM_RUN (EINTR)."""


def kvm_init_cpu_signals() -> None:
    """Make SIG_IPI non-fatal and interrupting, so pthread_kill can push a vCPU out of KVM_RUN.

    Python can install handlers only from the main thread; a handler someone else installed
    (any Python callable) is kept, since it interrupts KVM_RUN just as well.
    """
    if callable(signal.getsignal(SIG_IPI)):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("create the first Machine on the main thread (it installs SIGUSR1)")
    signal.signal(SIG_IPI, _kvm_ipi_signal)


def kvm_cpu_kick(cpu: CPUState) -> None:
    """Make the vCPU's next (or current) KVM_RUN return EINTR at once: run->immediate_exit."""
    cpu.kvm_run.immediate_exit = 1


def kvm_cpu_kick_self(cpu: CPUState) -> None:
    """exit_request seen before KVM_RUN: enter anyway (to finish a pending IN/OUT), but leave."""
    kvm_cpu_kick(cpu)


def kvm_eat_signals(cpu: CPUState) -> None:
    """After an EINTR: the kick is consumed (Python already ran, or will run, the handler)."""
    cpu.kvm_run.immediate_exit = 0


def qemu_cpu_kick(cpu: CPUState) -> None:
    """Wake the vCPU's thread if it waits, and push it out of KVM_RUN if it is in there.

    Order matters: immediate_exit is set before the signal, so a thread that has not yet
    entered KVM_RUN sees the flag, and one already inside gets the signal. Call with the BQL.
    """
    cpu.halt_cond.notify_all()
    kvm_cpu_kick(cpu)
    tid = cpu.thread_id
    if tid is not None and tid != threading.get_ident():
        with contextlib.suppress(ProcessLookupError):  # the thread has just ended
            signal.pthread_kill(tid, SIG_IPI)


def kvm_cpu_synchronize_post_reset(cpu: CPUState) -> None:
    """Put the VMM's register copy into KVM now (after a reset or a boot set-up), so that
    KVM_GET_REGS from anywhere shows it, instead of waiting for the next KVM_RUN."""
    kvm_arch(cpu).kvm_arch_put_registers(cpu)
    cpu.vcpu_dirty = False


def cpu_exit(cpu: CPUState) -> None:
    """Ask the vCPU to leave kvm_cpu_exec as soon as it can (QEMU's cpu_exit)."""
    cpu.exit_request = True
    qemu_cpu_kick(cpu)


# --- the vCPU loop ----------------------------------------------------------------------------


def kvm_cpu_exec(cpu: CPUState, max_runs: int | None = None) -> int:
    """Enter the guest again and again until an exit needs the vCPU's thread; return why.

    Called, and returns, with the BQL held; the lock is dropped only around KVM_RUN, so
    devices run under it and other threads may use the machine while the guest runs.
    Returns EXCP_INTERRUPT (kicked, interrupt window, reset), EXCP_HLT, EXCP_DEBUG, or -1 on a
    fatal exit (`cpu.last_error` says what). `max_runs` (kvmlab's, for step/run) bounds the
    KVM_RUN calls: when it is reached after a handled exit the result is EXCP_INTERRUPT.
    """
    run = cpu.kvm_run
    board = cpu.board
    arch = kvm_arch(cpu)
    if arch.kvm_arch_process_async_events(cpu):
        cpu.exit_request = False
        return EXCP_HLT
    runs = 0
    ret = 0
    while ret == 0:
        if cpu.vcpu_dirty:  # registers changed by the VMM (boot, reset) go in first
            arch.kvm_arch_put_registers(cpu)
            cpu.vcpu_dirty = False
        arch.kvm_arch_pre_run(cpu)
        if cpu.exit_request:
            # KVM must be re-entered after an IO exit to finish the instruction: enter, but
            # with immediate_exit, so that KVM_RUN completes it and returns at once.
            kvm_cpu_kick_self(cpu)
        board.bql.release()
        try:
            cpu.k.ioctl(cpu.kvm_fd, KVM_RUN, 0)
            run_ret = 0
        except OSError as e:
            run_ret = -(e.errno or errno.EIO)
        finally:
            board.bql.acquire()
        cpu.runs += 1
        runs += 1
        arch.kvm_arch_post_run(cpu)

        if run_ret < 0:
            if run_ret in (-errno.EINTR, -errno.EAGAIN):
                kvm_eat_signals(cpu)
                kvm_log_exit(cpu, "INTR", errno.errorcode[-run_ret])
                ret = EXCP_INTERRUPT
                break
            cpu.last_error = f"kvm run failed: {os.strerror(-run_ret)}"
            ret = -1
            break

        cpu.halted = False  # an exit: the guest ran (a halt in the kernel has ended)
        reason = run.exit_reason
        if reason == KVM_EXIT_IO:
            io = run.io
            with memoryview(cpu.kvm_run_map) as page:
                data = page[io.data_offset : io.data_offset + io.size * io.count]
                kvm_handle_io(board.io, io.port, data, io.direction, io.size, io.count)
                data.release()
            ret = 0
        elif reason == KVM_EXIT_MMIO:
            mmio = run.mmio
            with memoryview(cpu.kvm_run_map) as page:
                data = page[MMIO_DATA_OFFSET : MMIO_DATA_OFFSET + mmio.len]
                address_space_rw(board.mmio, mmio.phys_addr, data, bool(mmio.is_write))
                data.release()
            ret = 0
        elif reason == KVM_EXIT_IRQ_WINDOW_OPEN:
            ret = EXCP_INTERRUPT  # back to the thread; the next pre_run injects
        elif reason == KVM_EXIT_SHUTDOWN:
            board.qemu_system_reset_request()  # a triple fault: the PC resets
            ret = EXCP_INTERRUPT
        elif reason == KVM_EXIT_SYSTEM_EVENT and run.system_event.type in SYSTEM_EVENTS:
            if run.system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN:
                board.qemu_system_shutdown_request(0)  # the guest powered off: exit status 0
            else:
                board.qemu_system_reset_request()
            ret = EXCP_INTERRUPT
        elif reason == KVM_EXIT_UNKNOWN:
            cpu.last_error = (
                f"KVM: unknown exit, hardware reason {run.hw.hardware_exit_reason:#x}\n"
                + arch.cpu_dump_state(cpu)
            )
            ret = -1
        elif reason == KVM_EXIT_INTERNAL_ERROR:
            ret = kvm_handle_internal_error(cpu)
        else:
            ret = arch.kvm_arch_handle_exit(cpu)  # HLT, DEBUG, EXCEPTION, FAIL_ENTRY on x86
        name = EXIT_REASON_NAMES.get(reason, str(reason))
        kvm_log_exit(cpu, name, cpu.last_error if ret < 0 else "")
        if ret == 0 and max_runs is not None and runs >= max_runs:
            ret = EXCP_INTERRUPT

    if ret < 0:
        log.error("vCPU %d stopped: %s", cpu.cpu_index, cpu.last_error)
    cpu.exit_request = False
    return ret


def kvm_handle_io(
    bus: Bus, port: int, data: memoryview, direction: int, size: int, count: int
) -> None:
    """Hand each of `count` elements of an IO exit to the port bus, in order.

    OUT: the guest's bytes are in `data`. IN: the devices' answers are written into `data`
    (the PIO page at run + io.data_offset), where KVM picks them up on the next KVM_RUN.
    """
    for i in range(count):
        element = data[i * size : (i + 1) * size]
        address_space_rw(bus, port, element, direction == KVM_EXIT_IO_OUT)
        element.release()


def kvm_handle_internal_error(cpu: CPUState) -> int:
    """KVM gave up on the guest (e.g. code outside RAM): report suberror, data, registers."""
    run = cpu.kvm_run
    internal = run.internal
    lines = [
        f"KVM internal error. Suberror: {internal.suberror} "
        f"({INTERNAL_ERRORS.get(internal.suberror, 'unknown')})"
    ]
    lines += [f"extra data[{i}]: {internal.data[i]:#018x}" for i in range(min(internal.ndata, 16))]
    failure = run.emulation_failure
    if (
        internal.suberror == KVM_INTERNAL_ERROR_EMULATION
        and internal.ndata >= 1
        and failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ):
        insn = bytes(failure.insn_bytes[: min(failure.insn_size, 15)])
        lines.append(f"instruction bytes: {insn.hex(' ')}")
    lines.append(kvm_arch(cpu).cpu_dump_state(cpu))
    cpu.last_error = "\n".join(lines)
    return -1


def kvm_log_exit(cpu: CPUState, reason: str, detail: str = "") -> None:
    """Append the exit just handled to the machine's exit log, with the guest's rip (pc)."""
    rip = kvm_arch(cpu).cpu_get_pc(cpu)
    run = cpu.kvm_run
    fields: dict[str, Any] = {"detail": detail}
    if reason == "IO":
        io = run.io
        n = io.size * io.count
        fields |= {
            "address": io.port,
            "direction": "out" if io.direction == KVM_EXIT_IO_OUT else "in",
            "size": io.size,
            "count": io.count,
            "data": bytes(cpu.kvm_run_map[io.data_offset : io.data_offset + n]),
        }
    elif reason == "MMIO":
        mmio = run.mmio
        fields |= {
            "address": mmio.phys_addr,
            "direction": "write" if mmio.is_write else "read",
            "size": mmio.len,
            "count": 1,
            "data": bytes(mmio.data[: mmio.len]),
        }
    cpu.board.exit_log.append(cpu.cpu_index, reason, rip, **fields)
