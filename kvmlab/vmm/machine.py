"""A small PC run on KVM: RAM, vCPUs, the 8259 PICs, the 8254 PIT, a UART and small ports.

`MachineState` is what every board shares (RAM, vCPU threads, the big lock, pause/stop/reset);
`Machine` is the PC on top of it (`vmm.virt.Virt` is the arm64 board).

The PC takes interrupts one of two ways, chosen with `irqchip`: "user" (the default), where
the 8259s and the 8254 are models here and every interrupt is injected with KVM_INTERRUPT,
or "kernel", where KVM has them (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2), devices raise lines
with KVM_IRQ_LINE and HLT sleeps in the kernel, as QEMU runs almost every x86 guest.

Two ways to run it:

- synchronously, on the caller's thread: `machine.run(max_exits=...)` and `machine.step()`,
  for notebooks and tests that want to look between exits;
- on threads, one per vCPU, in QEMU's `kvm_vcpu_thread_fn` loop: `start()`, `pause()`,
  `resume()`, `reset()`, `wait()`, `stop()`.

As in QEMU, one big lock (the BQL) is held whenever devices or the machine's state are
touched, and each vCPU thread drops it only inside KVM_RUN. Other threads make a vCPU leave
KVM_RUN with a kick (`qemu_cpu_kick`: immediate_exit, then SIGUSR1 to its thread). Every wait
has a timeout, so a runaway guest cannot hang the VMM; `stop()` always returns.
https://gitlab.com/qemu-project/qemu/-/blob/master/accel/kvm/kvm-accel-ops.c
https://gitlab.com/qemu-project/qemu/-/blob/master/system/cpus.c
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib
import logging
import mmap
import threading
import time
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Self

from kvmlab.uapi import KVM_MP_STATE_RUNNABLE, kvm_regs, kvm_sregs
from kvmlab.vmm.boot import BOOT_STACK, setup_mode
from kvmlab.vmm.cpu import (
    CPU_INTERRUPT_HARD,
    EXCP_DEBUG,
    EXCP_HLT,
    EXCP_INTERRUPT,
    CPUState,
)
from kvmlab.vmm.exitlog import ExitLog, ExitRecord
from kvmlab.vmm.hw.debugcon import DEBUGCON_IOBASE, DebugCon
from kvmlab.vmm.hw.debugexit import DEBUG_EXIT_IOBASE, DEBUG_EXIT_IOSIZE, DebugExit
from kvmlab.vmm.hw.i8254 import I8254, PCSPK_IOBASE, PIT_IOBASE, PIT_IOSIZE, PIT_IRQ, PCSpk
from kvmlab.vmm.hw.i8259 import I8259, PIC_ELCR_IOBASE, PIC_MASTER_IOBASE, PIC_SLAVE_IOBASE
from kvmlab.vmm.hw.kvm import IO_APIC_DEFAULT_ADDRESS, KVMIOAPIC, KVMPic, KVMPit
from kvmlab.vmm.hw.kvm.ioapic import IOAPIC_SPACE_SIZE
from kvmlab.vmm.hw.post import POST_IOBASE, PostPort
from kvmlab.vmm.hw.serial import Serial16550
from kvmlab.vmm.i386 import (
    kvm_arch_get_registers,
    kvm_get_apic,
    kvm_get_mp_state,
    kvm_put_apic,
    kvm_put_mp_state,
)
from kvmlab.vmm.kvm_all import (
    KVMState,
    cpu_exit,
    kvm_cpu_exec,
    kvm_cpu_synchronize_post_reset,
    kvm_destroy_vcpu,
    kvm_init,
    kvm_init_cpu_signals,
    kvm_init_vcpu,
    kvm_set_user_memory_region,
    qemu_cpu_kick,
)
from kvmlab.vmm.memory import IoBus, MmioBus
from kvmlab.vmm.timer import TimerList

log = logging.getLogger("kvmlab.vmm")
DEFAULT_RAM_SIZE = 0x200000  # 2 MiB at guest-physical 0
COM1_IOBASE, COM1_IRQ = 0x3F8, 4
WAKE_INTERVAL = 0.05  # how often a waiting thread re-checks and re-kicks (seconds)
HALT_CHECK_NS = 100_000_000  # kernel irqchip: a vCPU this long in KVM_RUN without an exit is
# kicked out to read its mp_state (is it asleep in HLT?)
IDLE_LIMIT_NS = 1_000_000_000  # ... and one asleep with IF set is looked at again this often
IRQCHIP_MODES = ("user", "kernel")
STATES = ("created", "running", "paused", "shutdown", "internal-error", "debug", "stopped")


@dataclass
class RamBlock:
    """Guest RAM: an anonymous mapping registered as one memory slot."""

    slot: int
    gpa: int
    mem: mmap.mmap

    @property
    def size(self) -> int:
        return len(self.mem)


class MachineState:
    """A VM on the syscall face `k` (default: `kvmlab.sys`, the simulator), any architecture.

    RAM, the vCPUs and their threads, the buses, the exit log, pause/stop/reset: what QEMU's
    cpus.c and MachineState give every board. A board (`Machine`, the PC; `vmm.virt.Virt`)
    says where its RAM is (`ram_base`), how it creates and resets a vCPU (`cpu_init`,
    `cpu_reset`) and adds its devices. Use it as a context manager, or call `close()`, to give
    the fds and memory back.
    """

    ram_base = 0  # guest-physical address of the board's RAM
    kernel_irqchip = False  # KVM_CREATE_IRQCHIP at kvm_init: HLT stays in KVM (kvm_halt_in_kernel)

    def __init__(
        self,
        k: ModuleType | None = None,
        *,
        ram_size: int = DEFAULT_RAM_SIZE,
        cpus: int = 1,
        log_limit: int = 100_000,
    ) -> None:
        self.k: Any = k if k is not None else importlib.import_module("kvmlab.sys")
        self.bql = threading.RLock()
        self.pause_cond = threading.Condition(self.bql)  # a vCPU became stopped
        self.state_cond = threading.Condition(self.bql)  # machine state or a halt changed
        self.exit_log = ExitLog(log_limit)
        self.io = IoBus()
        self.mmio = MmioBus()
        self.state = "created"
        self.exit_code: int | None = None  # set by the exit device
        self.reset_requested = False
        self.resets = 0
        self.ram_blocks: list[RamBlock] = []
        self.cpus: list[CPUState] = []
        self._images: list[tuple[int, bytes]] = []  # what load() wrote: reloaded on reset
        self._threads: list[threading.Thread] = []
        self.timers = TimerList(self.bql)
        self.timers.start()
        self._halt_check = self.timers.timer_new(self._kvm_halt_check)
        self._runs_seen: dict[int, int] = {}  # vCPU -> its KVM_RUN count at the last check
        self._asleep_since: dict[int, int] = {}  # vCPU -> when a look first found it in HLT
        kvm_init_cpu_signals()
        self.kvm: KVMState | None = kvm_init(self.k, self.kernel_irqchip)
        try:
            self.ram = self.add_ram(self.ram_base, ram_size)
            for index in range(cpus):
                self.cpus.append(self.cpu_init(self.kvm, index))
        except BaseException:
            self.close()
            raise

    def cpu_init(self, kvm: KVMState, index: int) -> CPUState:
        """Create vCPU `index` and remember its reset state (the board's kind of CPU)."""
        raise NotImplementedError

    def cpu_reset(self, cpu: CPUState) -> None:
        """Put `cpu` back in the state it boots in (machine reset; mark it vcpu_dirty)."""
        raise NotImplementedError

    def cpu_get_pic_interrupt(self, cpu: CPUState) -> int:
        """The vector to inject into `cpu` now, or -1 (the board's interrupt controller)."""
        raise NotImplementedError

    # --- memory -------------------------------------------------------------------------------

    def add_ram(self, gpa: int, size: int) -> mmap.mmap:
        """Allocate `size` bytes of anonymous memory and make it guest RAM at `gpa`."""
        assert self.kvm is not None
        mem = mmap.mmap(-1, size)
        view = (ctypes.c_char * size).from_buffer(mem)
        hva = ctypes.addressof(view)
        del view  # release the export, or the mapping could never be closed
        slot = len(self.ram_blocks)
        try:
            kvm_set_user_memory_region(self.kvm, slot, gpa, size, hva)
        except BaseException:
            mem.close()
            raise
        self.ram_blocks.append(RamBlock(slot, gpa, mem))
        return mem

    def _ram_at(self, gpa: int, size: int) -> tuple[mmap.mmap, int] | None:
        for block in self.ram_blocks:
            if block.gpa <= gpa and gpa + size <= block.gpa + block.size:
                return block.mem, gpa - block.gpa
        return None

    def memory_read(self, gpa: int, size: int) -> bytes | None:
        """`size` bytes of guest RAM at `gpa`, or None if they are not all RAM."""
        found = self._ram_at(gpa, size)
        if found is None:
            return None
        mem, offset = found
        return bytes(mem[offset : offset + size])

    def memory_write(self, gpa: int, data: bytes) -> None:
        """Write guest RAM (ValueError where there is none)."""
        found = self._ram_at(gpa, len(data))
        if found is None:
            raise ValueError(f"no guest RAM at {gpa:#x}+{len(data):#x}")
        mem, offset = found
        mem[offset : offset + len(data)] = data

    def load(self, data: bytes, gpa: int) -> None:
        """Load a flat binary at `gpa`; it is loaded again on every reset (like a ROM)."""
        self.memory_write(gpa, data)
        self._images.append((gpa, bytes(data)))

    def load_at(self, gpa: int, data: bytes) -> None:
        """load() with the arguments the other way round: the boot helpers' writer."""
        self.load(data, gpa)

    # --- requests from devices and exits ------------------------------------------------------

    def qemu_system_reset_request(self) -> None:
        """The guest asked for a reset (triple fault): done by the vCPU loop, all CPUs paused."""
        self.reset_requested = True
        for cpu in self.cpus:
            cpu_exit(cpu)

    def qemu_system_shutdown_request(self, code: int) -> None:
        """The exit device was written: stop the machine with that exit code."""
        with self.bql:
            self.exit_code = code
            self.vm_stop("shutdown")

    def vm_stop(self, state: str) -> None:
        """Enter `state` and make every vCPU stop at its next chance (no waiting: callable
        from a vCPU thread)."""
        with self.bql:
            self._set_state(state)
            for cpu in self.cpus:
                cpu.stop = True
                cpu_exit(cpu)

    def vm_start(self) -> None:
        """Continue after a debug stop, as QEMU's gdbstub does with vm_start(): the vCPUs run
        again (on their threads, or at the next run()/step()), and kicks sent for the stop that
        arrived after it are dropped."""
        with self.bql:
            if self.state != "debug":
                raise RuntimeError(f"cannot continue a machine that is {self.state}")
            for cpu in self.cpus:
                cpu.exit_request = False
                cpu.kvm_run.immediate_exit = 0
            if self._threads:
                self._set_state("running")
                self.resume_all_vcpus()
            else:
                for cpu in self.cpus:
                    cpu.stop = False
                self._set_state("created")

    def _set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown machine state {state!r}")
        if self.state != "stopped":  # stop() is final
            self.state = state
        self.state_cond.notify_all()

    # --- synchronous running --------------------------------------------------------------------

    def run(self, max_exits: int = 100_000, cpu: int = 0) -> int:
        """Run vCPU `cpu` on this thread until it halts, the machine stops, or `max_exits`
        KVM_RUN calls; return the last kvm_cpu_exec result (EXCP_HLT, EXCP_INTERRUPT, ...)."""
        c = self.cpus[cpu]
        with self.bql:
            self._claim_for_sync_run(c)
            start = c.runs
            try:
                while True:
                    left = max_exits - (c.runs - start)
                    if left <= 0:
                        return EXCP_INTERRUPT
                    r = kvm_cpu_exec(c, max_runs=left)
                    if self.reset_requested:
                        self.reset_requested = False
                        self.qemu_system_reset()
                        continue
                    self._after_exec(c, r)
                    if r == EXCP_HLT and self._wait_for_work(c):
                        continue
                    if r == EXCP_INTERRUPT and self._asleep_in_kernel(c):
                        return EXCP_HLT
                    if r != EXCP_INTERRUPT or c.stop or c.unplug or self.state != "created":
                        return r
            finally:
                self._release_sync_run(c)

    def step(self, cpu: int = 0) -> ExitRecord | None:
        """One KVM_RUN on this thread and the handling of its exit; the record logged, if any."""
        c = self.cpus[cpu]
        with self.bql:
            self._claim_for_sync_run(c)
            before = self.exit_log.dropped + len(self.exit_log)
            try:
                r = kvm_cpu_exec(c, max_runs=1)
                if self.reset_requested:
                    self.reset_requested = False
                    self.qemu_system_reset()
                self._after_exec(c, r)
            finally:
                self._release_sync_run(c)
            grew = self.exit_log.dropped + len(self.exit_log) > before
            return self.exit_log[-1] if grew else None

    def _wait_for_work(self, cpu: CPUState, limit: float = 1.0) -> bool:
        """A synchronous run halted with a timer armed: wait (BQL released) for it to fire.

        False at once if nothing can wake the vCPU (IF clear, no timer), or after `limit`
        seconds without an interrupt it can take (a masked line, say).
        """
        if not (cpu.if_flag and self.timers.armed()):
            return False
        woke = cpu.halt_cond.wait_for(lambda: self.cpu_has_work(cpu) or cpu.stop, limit)
        return woke and not cpu.stop

    def _asleep_in_kernel(self, cpu: CPUState) -> bool:
        """With HLT in the kernel, a synchronous run ends when a look finds the vCPU asleep
        with IF clear (for good), or asleep without an exit for IDLE_LIMIT_NS (no interrupt
        it could see came: run() gives up, as _wait_for_work does after its limit)."""
        if not (self.kernel_irqchip and cpu.halted):
            return False
        since = self._asleep_since.get(cpu.cpu_index, self.timers.clock())
        return not cpu.if_flag or self.timers.clock() - since >= IDLE_LIMIT_NS

    def _claim_for_sync_run(self, cpu: CPUState) -> None:
        if self._threads:
            raise RuntimeError("the vCPUs run on their threads: use pause()/resume()/wait()")
        if self.state != "created":
            raise RuntimeError(f"the machine is {self.state}; reset() it to run again")
        cpu.stop = cpu.stopped = False
        cpu.thread_id = threading.get_ident()
        self._arm_halt_check()

    def _release_sync_run(self, cpu: CPUState) -> None:
        cpu.thread_id = None
        cpu.stop = False

    def _after_exec(self, cpu: CPUState, r: int) -> None:
        if r < 0:
            self.vm_stop("internal-error")
        elif r == EXCP_DEBUG:
            self.vm_stop("debug")  # QEMU hands this to the gdbstub
        elif r == EXCP_HLT:
            self.state_cond.notify_all()
        elif r == EXCP_INTERRUPT and self.kernel_irqchip:
            was_asleep = cpu.halted  # the last look's answer; any exit since cleared it
            kvm_get_mp_state(cpu)  # kicked: is it asleep in HLT? (cpu_synchronize_state)
            if not cpu.halted:
                self._asleep_since.pop(cpu.cpu_index, None)
            elif not was_asleep:
                self._asleep_since[cpu.cpu_index] = self.timers.clock()
            if cpu.halted:
                self.state_cond.notify_all()

    # --- HLT in the kernel: looking at a vCPU that sleeps in KVM_RUN ---------------------------

    def _arm_halt_check(self) -> None:
        if self.kernel_irqchip:
            self._halt_check.timer_mod(self.timers.clock() + HALT_CHECK_NS)

    def _kvm_halt_check(self) -> None:
        """Kick each vCPU that stayed in KVM_RUN without an exit since the last check, so that
        it comes out and reads its mp_state: HLT never exits, and only mp_state HALTED says
        the vCPU sleeps. One found asleep is looked at again only with IF set, and only every
        IDLE_LIMIT_NS; with IF clear only another vCPU (INIT, NMI) could wake it. Runs on the
        timer thread, every HALT_CHECK_NS while some vCPU is in a run."""
        in_run = False
        now = self.timers.clock()
        for cpu in self.cpus:
            if cpu.thread_id is None or cpu.stop or cpu.stopped:
                continue
            in_run = True
            seen = self._runs_seen.get(cpu.cpu_index)
            self._runs_seen[cpu.cpu_index] = cpu.runs
            if cpu.runs != seen:
                continue  # it came out since the last check
            asleep_for = now - self._asleep_since.get(cpu.cpu_index, now)
            if not cpu.halted or (cpu.if_flag and asleep_for >= IDLE_LIMIT_NS):
                qemu_cpu_kick(cpu)
        if in_run:
            self._arm_halt_check()

    # --- vCPU threads -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start one thread per vCPU, each running kvm_vcpu_thread_fn."""
        with self.bql:
            if self._threads or self.state != "created":
                raise RuntimeError(f"cannot start a machine that is {self.state}")
            self._set_state("running")
            self._arm_halt_check()
            for cpu in self.cpus:
                thread = threading.Thread(
                    target=self.kvm_vcpu_thread_fn,
                    args=(cpu,),
                    name=f"CPU {cpu.cpu_index}/KVM",
                    daemon=True,  # a vCPU stuck beyond every timeout must not block exit
                )
                self._threads.append(thread)
                thread.start()

    def kvm_vcpu_thread_fn(self, cpu: CPUState) -> None:
        """A vCPU thread: run the guest while allowed, else wait for work (QEMU's loop)."""
        with self.bql:
            cpu.thread_id = threading.get_ident()
            try:
                while True:
                    if self.cpu_can_run(cpu):
                        r = kvm_cpu_exec(cpu)
                        self._after_exec(cpu, r)
                    if self.reset_requested and not cpu.stop:
                        self.reset_requested = False
                        self._system_reset_from_vcpu(cpu)
                    self.qemu_wait_io_event(cpu)
                    if cpu.unplug:
                        break
            except Exception as e:  # a device model bug: stop the machine, say why
                cpu.last_error = f"{type(e).__name__}: {e}"
                log.exception("vCPU %d thread failed", cpu.cpu_index)
                self.vm_stop("internal-error")
            finally:
                cpu.thread_id = None
                cpu.stopped = True
                self.pause_cond.notify_all()
                self.state_cond.notify_all()

    @staticmethod
    def cpu_can_run(cpu: CPUState) -> bool:
        return not (cpu.stop or cpu.stopped or cpu.unplug)

    @staticmethod
    def cpu_has_work(cpu: CPUState) -> bool:
        """An interrupt the vCPU can take now (what wakes it from HLT)."""
        return bool(cpu.interrupt_request & CPU_INTERRUPT_HARD) and cpu.if_flag

    def _halted_for_good(self, cpu: CPUState) -> bool:
        """Halted with no interrupt to take now and none that a timer could bring. With HLT
        in the kernel the VMM cannot see KVM's timers: only a halt with IF clear counts."""
        if self.kernel_irqchip:
            return cpu.halted and not cpu.if_flag
        if not cpu.halted or self.cpu_has_work(cpu):
            return False
        return not (cpu.if_flag and self.timers.armed())

    def cpu_thread_is_idle(self, cpu: CPUState) -> bool:
        if cpu.stop or cpu.unplug:
            return False
        if cpu.stopped:
            return True
        if self.kernel_irqchip:
            return False  # a halted vCPU waits inside KVM_RUN (kvm_halt_in_kernel)
        return cpu.halted and not self.cpu_has_work(cpu)

    def qemu_wait_io_event(self, cpu: CPUState) -> None:
        """Sleep while there is nothing to do; turn a stop request into `stopped`."""
        while self.cpu_thread_is_idle(cpu):
            cpu.halt_cond.wait(WAKE_INTERVAL * 10)  # kicks notify; the timeout bounds a miss
        if cpu.stop:
            cpu.stop = False
            cpu.stopped = True
            self.pause_cond.notify_all()
            self.state_cond.notify_all()

    def _current_cpu(self) -> CPUState | None:
        me = threading.get_ident()
        return next((c for c in self.cpus if c.thread_id == me), None)

    def all_vcpus_paused(self) -> bool:
        return all(c.stopped or c.thread_id is None for c in self.cpus)

    def pause_all_vcpus(self, timeout: float = 1.0) -> bool:
        """Stop every vCPU outside KVM_RUN; False if one did not come out within `timeout`."""
        with self.bql:
            current = self._current_cpu()
            for cpu in self.cpus:
                if cpu is current:
                    cpu.stop, cpu.stopped = False, True  # cpu_stop_current
                else:
                    cpu.stop = True
                    qemu_cpu_kick(cpu)
            deadline = time.monotonic() + timeout
            while not self.all_vcpus_paused():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.pause_cond.wait(min(remaining, WAKE_INTERVAL))
                for cpu in self.cpus:  # a signal that arrived just before KVM_RUN: kick again
                    if not cpu.stopped:
                        qemu_cpu_kick(cpu)
            return True

    def resume_all_vcpus(self) -> None:
        with self.bql:
            for cpu in self.cpus:
                cpu.stop = cpu.stopped = False
                qemu_cpu_kick(cpu)

    def pause(self, timeout: float = 1.0) -> bool:
        """Pause all vCPU threads; False (and still running) if one could not be stopped."""
        with self.bql:
            if not self._threads or self.state != "running":
                raise RuntimeError(f"cannot pause a machine that is {self.state}")
            if not self.pause_all_vcpus(timeout):
                return False
            self._set_state("paused")
            return True

    def resume(self) -> None:
        """Let paused vCPU threads run again."""
        with self.bql:
            if self.state != "paused":
                raise RuntimeError(f"cannot resume a machine that is {self.state}")
            self._set_state("running")
            self.resume_all_vcpus()

    def wait(self, timeout: float = 5.0) -> bool:
        """Wait until the machine stops running (exit device, error, stop) or every vCPU is
        halted with nothing to wake it; False if still busy after `timeout` seconds."""

        def quiet() -> bool:
            if self.state != "running":
                return True
            return all(c.stopped or self._halted_for_good(c) for c in self.cpus)

        with self.bql:
            return self.state_cond.wait_for(quiet, timeout)

    def stop(self, timeout: float = 1.0) -> bool:
        """End every vCPU thread (or a synchronous run on another thread); always returns.

        True if all of them ended within `timeout`. The machine cannot run again after this.
        """
        with self.bql:
            self._set_state("stopped")
            for cpu in self.cpus:
                cpu.unplug = cpu.stop = True
                cpu_exit(cpu)
        me = threading.current_thread()
        deadline = time.monotonic() + timeout
        while True:
            busy = [t for t in self._threads if t.is_alive() and t is not me]
            syncing = [c for c in self.cpus if c.thread_id not in (None, threading.get_ident())]
            if not busy and not syncing:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("stop(): %d vCPU(s) did not leave KVM_RUN", len(busy) + len(syncing))
                return False
            if busy:
                busy[0].join(min(remaining, WAKE_INTERVAL))
            else:
                time.sleep(min(remaining, WAKE_INTERVAL / 10))
            with self.bql:
                for cpu in self.cpus:
                    if cpu.thread_id is not None:
                        qemu_cpu_kick(cpu)

    # --- reset --------------------------------------------------------------------------------

    def reset(self, timeout: float = 1.0) -> None:
        """Reset the machine: vCPUs to their boot state, images reloaded, devices reset.

        A running machine is paused around the reset and runs on; a stopped-by-the-guest one
        ("shutdown", "internal-error", "debug") becomes runnable again.
        """
        with self.bql:
            if self.state == "stopped":
                raise RuntimeError("the machine is stopped")
            if self._threads and not self.pause_all_vcpus(timeout):
                raise TimeoutError("a vCPU did not stop for the reset")
            self.qemu_system_reset()
            if self._threads:
                self._set_state("running")
                self.resume_all_vcpus()
            else:
                self._set_state("created")

    def _system_reset_from_vcpu(self, cpu: CPUState) -> None:
        """A reset requested by the guest, done on its vCPU thread with the others paused."""
        if not self.pause_all_vcpus():
            cpu.last_error = "reset: a vCPU did not stop"
            self.vm_stop("internal-error")
            return
        self.qemu_system_reset()
        self.resume_all_vcpus()

    def qemu_system_reset(self) -> None:
        """Every vCPU back to its boot registers, every image reloaded, every device reset.

        RAM outside the images keeps its contents, as on a PC's warm reset.
        """
        with self.bql:
            for cpu in self.cpus:
                self.cpu_reset(cpu)
                kvm_cpu_synchronize_post_reset(cpu)
                cpu.halted = False
                cpu.interrupt_request = 0
            for gpa, data in self._images:
                self.memory_write(gpa, data)
            for device in self.io.devices() + self.mmio.devices():
                device.reset()
            self.exit_code = None
            self.resets += 1

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the vCPUs and give back every fd and mapping (kept if a vCPU is stuck)."""
        self.timers.close()
        if not self.stop():
            log.error("close(): leaving the VM's fds open, a vCPU thread is still running")
            return
        for cpu in self.cpus:
            kvm_destroy_vcpu(cpu)
        self.cpus = []
        if self.kvm is not None:
            for fd in (self.kvm.vmfd, self.kvm.fd):
                with contextlib.suppress(OSError):
                    self.k.close(fd)
            self.kvm = None
        for block in self.ram_blocks:
            block.mem.close()
        self.ram_blocks = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.k.name} {len(self.cpus)} vCPU(s) {self.state}>"


@dataclass(frozen=True)
class BootState:
    """What a vCPU goes back to at a machine reset: its registers and, with the irqchip in
    the kernel, its mp_state (an AP that waits for INIT/SIPI) and local APIC page."""

    regs: bytes
    sregs: bytes
    mp_state: int = KVM_MP_STATE_RUNNABLE
    lapic: bytes | None = None


class Machine(MachineState):
    """A PC-like VM on the syscall face `k` (default: `kvmlab.sys`, the simulator).

    `cpus` vCPUs, `ram_size` bytes of RAM at guest-physical 0, the two 8259s at 0x20/0xa0
    (`pic`, interrupts to vCPU 0), the 8254 at 0x40 (`pit`, IRQ 0) with port 0x61, COM1 at
    0x3f8 (`serial`, IRQ 4), isa-debug-exit at 0x501 (`debug_exit`), the 0xe9 debug console
    (`debugcon`) and the POST port 0x80 (`post`). The guest programs the PICs itself, as a
    PC's firmware would. More devices go on `io` (ports) and `mmio` (addresses outside RAM).
    Use it as a context manager, or call `close()`, to give the fds and memory back.

    `irqchip="user"` (the default) has QEMU's 8259 and 8254 models (`pic`, `pit`) and
    injects with KVM_INTERRUPT. `irqchip="kernel"` puts them in KVM, with the IOAPIC at
    0xfec00000 (`ioapic`) and a local APIC per vCPU: `pic` and `pit` are then QEMU's kvm-i8259
    and kvm-pit (vmm.hw.kvm), devices raise lines with KVM_IRQ_LINE, HLT sleeps in KVM, and
    the vCPUs after the first start as application processors waiting for INIT and SIPI
    unless `boot()` or `setup_cpu()` points them at code.
    """

    pic: I8259 | KVMPic
    pit: I8254 | KVMPit

    def __init__(
        self,
        k: ModuleType | None = None,
        *,
        ram_size: int = DEFAULT_RAM_SIZE,
        cpus: int = 1,
        log_limit: int = 100_000,
        irqchip: str = "user",
    ) -> None:
        if irqchip not in IRQCHIP_MODES:
            raise ValueError(f"irqchip must be 'user' or 'kernel', not {irqchip!r}")
        self.irqchip = irqchip
        self.kernel_irqchip = irqchip == "kernel"
        self._boot_state: dict[int, BootState] = {}  # cpu -> what a reset restores
        super().__init__(k, ram_size=ram_size, cpus=cpus, log_limit=log_limit)
        try:
            if self.kernel_irqchip:
                self._kvm_irqchip_devices()
            else:
                self._userspace_irqchip_devices()
            self.io.register(PCSPK_IOBASE, 1, PCSpk(self.pit))
        except BaseException:
            self.close()
            raise
        self.post = PostPort()
        self.io.register(POST_IOBASE, 1, self.post)
        self.serial = Serial16550(on_irq=lambda level: self.set_irq(COM1_IRQ, level), lock=self.bql)
        self.io.register(COM1_IOBASE, 8, self.serial)
        self.debug_exit = DebugExit(on_exit=self.qemu_system_shutdown_request)
        self.io.register(DEBUG_EXIT_IOBASE, DEBUG_EXIT_IOSIZE, self.debug_exit)
        self.debugcon = DebugCon()
        self.io.register(DEBUGCON_IOBASE, 1, self.debugcon)

    def _userspace_irqchip_devices(self) -> None:
        """QEMU's i8259 and i8254 models: every interrupt goes through the VMM."""
        self.pic = pic = I8259(on_int=self.pic_irq_request)
        self.io.register(PIC_MASTER_IOBASE, 2, pic.master)
        self.io.register(PIC_SLAVE_IOBASE, 2, pic.slave)
        self.io.register(PIC_ELCR_IOBASE, 2, pic.elcr)
        self.pit = I8254(self.timers, on_irq=lambda level: self.set_irq(PIT_IRQ, level))
        self.io.register(PIT_IOBASE, PIT_IOSIZE, self.pit)

    def _kvm_irqchip_devices(self) -> None:
        """kvm-i8259, kvm-ioapic and kvm-pit: the chips are KVM's (kvm_init already made the
        irqchip; this adds KVM_CREATE_PIT2, as QEMU's kvm_pit_init) and only hold their
        addresses here, so no other device takes them."""
        assert self.kvm is not None
        self.pic = pic = KVMPic(self.kvm)
        self.io.register(PIC_MASTER_IOBASE, 2, pic.master)
        self.io.register(PIC_SLAVE_IOBASE, 2, pic.slave)
        self.ioapic = self.mmio.register(
            IO_APIC_DEFAULT_ADDRESS, IOAPIC_SPACE_SIZE, KVMIOAPIC(self.kvm)
        )
        self.pit = self.io.register(PIT_IOBASE, PIT_IOSIZE, KVMPit(self.kvm, self.timers.clock))

    def cpu_init(self, kvm: KVMState, index: int) -> CPUState:
        """KVM_CREATE_VCPU; its reset state is where reset() returns until setup_cpu."""
        cpu = kvm_init_vcpu(kvm, index, self)
        self._save_boot_state(cpu)
        return cpu

    def _save_boot_state(self, cpu: CPUState) -> None:
        """Remember the vCPU's state as it is now (in KVM) for reset(): with the irqchip in
        the kernel, also its mp_state and local APIC as KVM made them."""
        mp_state, lapic = KVM_MP_STATE_RUNNABLE, None
        if self.kernel_irqchip:
            kvm_get_mp_state(cpu)
            mp_state, lapic = cpu.mp_state, kvm_get_apic(cpu)
        self._boot_state[cpu.cpu_index] = BootState(
            bytes(cpu.regs), bytes(cpu.sregs), mp_state, lapic
        )

    def cpu_reset(self, cpu: CPUState) -> None:
        boot = self._boot_state[cpu.cpu_index]
        cpu.regs = kvm_regs.from_buffer_copy(boot.regs)
        cpu.sregs = kvm_sregs.from_buffer_copy(boot.sregs)
        cpu.vcpu_dirty = True
        if boot.lapic is not None:  # QEMU's kvm_apic_reset and kvm_put_mp_state
            kvm_put_apic(cpu, boot.lapic)
            cpu.mp_state = boot.mp_state
            kvm_put_mp_state(cpu)

    # --- boot ---------------------------------------------------------------------------------

    def setup_cpu(
        self, index: int = 0, mode: str = "real", entry: int = 0x1000, stack: int = BOOT_STACK
    ) -> None:
        """Put vCPU `index` in `mode` ("real", "protected", "long") at `entry`; reset returns here.

        The GDT and page tables are loaded like any image, so a reset restores them too. With
        the irqchip in the kernel the vCPU is also made RUNNABLE (KVM_SET_MP_STATE): an
        application processor pointed at code by the VMM does not wait for INIT/SIPI.
        """
        with self.bql:
            if self._threads and self.state == "running":
                raise RuntimeError("pause() the machine before changing a vCPU")
            cpu = self.cpus[index]
            kvm_arch_get_registers(cpu)  # cpu_synchronize_state
            setup_mode(self.load_at, cpu.regs, cpu.sregs, mode, entry, stack)
            kvm_cpu_synchronize_post_reset(cpu)
            if self.kernel_irqchip:
                cpu.mp_state = KVM_MP_STATE_RUNNABLE
                kvm_put_mp_state(cpu)
            cpu.halted = False
            # reset() returns here; the local APIC stays the one KVM made at creation (the
            # guest may have programmed it since)
            self._boot_state[index] = dataclasses.replace(
                self._boot_state[index],
                regs=bytes(cpu.regs),
                sregs=bytes(cpu.sregs),
                mp_state=KVM_MP_STATE_RUNNABLE,
            )

    def boot(
        self, code: bytes, mode: str = "real", entry: int = 0x1000, *, aps: bool = True
    ) -> Machine:
        """Load `code` at `entry` and point every vCPU there in `mode`; returns the machine.

        With `aps=False` only vCPU 0 (the bootstrap processor) is pointed at `entry`: the
        others keep their reset state, which with the irqchip in the kernel means waiting
        for the INIT and SIPI the guest's BSP sends through its local APIC.
        """
        self.load(code, entry)
        for cpu in self.cpus if aps else self.cpus[:1]:
            self.setup_cpu(cpu.cpu_index, mode, entry)
        return self

    # --- interrupts: ISA lines -> the 8259s -> INT of vCPU 0 (no APIC: QEMU's pic_irq_request) --

    def set_irq(self, line: int, level: bool) -> None:
        """A device's ISA interrupt line (0-15) changed level: into the PIC model, or into
        KVM's irqchip with KVM_IRQ_LINE (QEMU's kvm_pic_set_irq -> kvm_set_irq)."""
        with self.bql:
            self.pic.set_irq(line, level)

    def pic_irq_request(self, level: bool) -> None:
        """The master PIC's INT pin: pending for vCPU 0 while high, and a kick when it rises."""
        cpu = self.cpus[0]
        if level:
            cpu.interrupt_request |= CPU_INTERRUPT_HARD
            qemu_cpu_kick(cpu)
        else:
            cpu.interrupt_request &= ~CPU_INTERRUPT_HARD

    def cpu_get_pic_interrupt(self, cpu: CPUState) -> int:
        """The INTA cycle: the vector the PICs deliver now (INT drops if nothing else waits).
        Only the userspace irqchip has one: KVM acknowledges its own PIC."""
        assert isinstance(self.pic, I8259)
        return self.pic.pic_read_irq()
