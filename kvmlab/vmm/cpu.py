"""The vCPU as the VMM sees it: QEMU's CPUState (include/hw/core/cpu.h), cut down.

It holds the vCPU fd and its mapped `kvm_run`, the register copy QEMU keeps in `env` (with
`vcpu_dirty` when that copy is newer than KVM's), and the flags other threads set to make the
vCPU leave KVM_RUN: `exit_request`, `stop`, `unplug`. The `Board` protocol is what the exit
handlers need from the machine around the CPU.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from kvmlab.uapi import kvm_regs, kvm_run, kvm_sregs
from kvmlab.vmm.exitlog import ExitLog
from kvmlab.vmm.memory import IoBus, MmioBus

# kvm_cpu_exec's results (include/exec/cpu-all.h): why the vCPU came back to its thread.
EXCP_INTERRUPT = 0x10000  # asked to come out: a kick, a signal, an interrupt window, a reset
EXCP_HLT = 0x10001  # the guest halted and no interrupt can wake it now
EXCP_DEBUG = 0x10002  # a debug exit (single step, breakpoint)

CPU_INTERRUPT_HARD = 0x0002  # cpu->interrupt_request: an external interrupt is pending


class Board(Protocol):
    """What the exit handlers use of the machine: the big lock, the buses, the log, the PIC."""

    bql: threading.RLock
    io: IoBus
    mmio: MmioBus
    exit_log: ExitLog

    def cpu_get_pic_interrupt(self, cpu: CPUState) -> int:
        """The vector to inject into `cpu` now, or -1 (and clear CPU_INTERRUPT_HARD if none)."""
        ...

    def qemu_system_reset_request(self) -> None:
        """Ask for a machine reset (the guest triple-faulted, or asked through PSCI)."""
        ...

    def qemu_system_shutdown_request(self, code: int) -> None:
        """Stop the machine with exit code `code` (the guest powered off)."""
        ...

    def memory_read(self, gpa: int, size: int) -> bytes | None:
        """Guest RAM at `gpa`, or None if no RAM is there (for error reports)."""
        ...


@dataclass(eq=False)
class CPUState:
    """One vCPU: its fd, its kvm_run page, its register copy and its run-control flags.

    This is an x86 CPU (QEMU's X86CPU); `vmm.arm.ARMCPU` is the arm64 one. `target` names the
    module of KVM hooks `kvm_cpu_exec` calls for it (target/<target>/kvm.c).
    """

    target: ClassVar[str] = "i386"
    kvm_run_type: ClassVar[type[Any]] = kvm_run  # struct kvm_run as this architecture lays it

    cpu_index: int
    k: Any  # the syscall face: kvmlab.sys or kvmlab.host
    kvm_fd: int  # the vCPU fd
    kvm_run_map: mmap.mmap  # KVM_GET_VCPU_MMAP_SIZE bytes: kvm_run, the PIO page, ...
    kvm_run: Any  # struct kvm_run over kvm_run_map
    board: Board
    regs: kvm_regs = field(default_factory=kvm_regs)  # QEMU's env: valid when vcpu_dirty
    sregs: kvm_sregs = field(default_factory=kvm_sregs)
    vcpu_dirty: bool = False  # regs/sregs are newer than KVM's: put them before KVM_RUN
    exit_request: bool = False  # leave kvm_cpu_exec at the next chance
    interrupt_request: int = 0  # CPU_INTERRUPT_HARD while an interrupt waits for injection
    halted: bool = False  # executed HLT; waits for an interrupt (kernel irqchip: KVM's mp_state)
    if_flag: bool = False  # kvm_arch_post_run's copy of run->if_flag (env->eflags & IF)
    cr8: int = 0
    apic_base: int = 0
    irqchip_in_kernel: bool = False  # KVM has its APIC: HLT and interrupts stay in the kernel
    mp_state: int = 0  # KVM_MP_STATE_*, as KVM_GET_MP_STATE last said (env->mp_state)
    stop: bool = False  # asked to pause; becomes `stopped` in qemu_wait_io_event
    stopped: bool = False
    unplug: bool = False  # asked to end its thread
    thread_id: int | None = None  # the thread running kvm_cpu_exec (for pthread_kill kicks)
    runs: int = 0  # KVM_RUN calls so far
    last_error: str = ""  # the report of the last fatal exit
    halt_cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.halt_cond = threading.Condition(self.board.bql)
