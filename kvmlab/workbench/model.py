"""The Workbench model: source, program, machine, history, and what every panel shows.

All state and logic live here, in plain Python, so tests drive it without a browser; the
widget only renders it. Each action (assemble, reset, step_instruction, step_kvm_run, run/stop,
back, serial_input) leaves a `View`: the registers before and after, the kvm_run area at the
exit, the RAM bytes it changed and the kernel's call path. Every error lands in `errors`.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kvmlab import host
from kvmlab.asm import AsmError, Program, assemble, disassemble
from kvmlab.cli import ASM_MODES
from kvmlab.kernel import trace
from kvmlab.uapi import (
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
    KVM_RUN,
    KVM_SET_GUEST_DEBUG,
    SEGMENT_NAMES,
    X86_EFER_LMA,
    kvm_guest_debug,
    kvm_regs,
    kvm_run,
    kvm_sregs,
)
from kvmlab.vmm import Machine
from kvmlab.vmm.i386 import kvm_arch_get_registers, x86_translate
from kvmlab.vmm.kvm_all import cpu_exit, kvm_cpu_synchronize_post_reset
from kvmlab.workbench import kvmrun
from kvmlab.workbench.state import MachineState, RamShadow, RamUndo, load_machine, save_machine
from kvmlab.workbench.watch import Tracer, Watchdog

MODES = tuple(ASM_MODES)  # "real", "protected", "long"
BACKENDS = ("sim", "host")
ENTRY = 0x1000
RAM_SIZE = 0x10000  # 64 KiB: room for the boot GDT, stack and long-mode page tables
MAX_BREAKPOINTS = 4  # DR0-DR3
STEP_TIMEOUT = 1.0  # seconds a Step KVM_RUN may take before the vCPU is kicked
RUN_TIMEOUT = 30.0  # seconds a Run may take before it is stopped
GPRS = [f[0] for f in kvm_regs._fields_]
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
DEFAULT_SOURCE = """\
; real mode, loaded at 0x1000: print "Hi" on COM1 and halt
    mov dx, 0x3f8
    mov al, 'H'
    out dx, al
    mov al, 'i'
    out dx, al
    hlt
"""


@dataclass(frozen=True)
class WorkbenchError:
    """An error shown in the widget: where it came from, what it says, the source line if any."""

    source: str  # "assembler", "guest", "handler", "callback", "workbench"
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{self.source}{where}: {self.message}"


@dataclass
class View:
    """What the panels show after an action; `prev_*` is the state before it."""

    action: str = ""
    regs: bytes = bytes(ctypes.sizeof(kvm_regs))
    sregs: bytes = bytes(ctypes.sizeof(kvm_sregs))
    prev_regs: bytes = bytes(ctypes.sizeof(kvm_regs))
    prev_sregs: bytes = bytes(ctypes.sizeof(kvm_sregs))
    run_area: bytes = b""  # kvm_run page and PIO page at the last exit
    prev_run_area: bytes | None = None  # the same at the exit before
    ram_changed: dict[int, bytes] = field(default_factory=dict)  # gpa -> old byte values
    trace: str = ""  # the kernel call path of the action (simulator only)


@dataclass
class Entry:
    """One step of history: the state before an action, and how to redo that action."""

    view: View
    machine: MachineState
    pending: bool  # KVM still owes the completion of an IO/MMIO exit here
    redo: Callable[[], None] | None
    ram: RamUndo = field(default_factory=RamUndo)


def backend(name: str) -> ModuleType:
    """The syscall face called `name`: "sim" (kvmlab.sys) or "host" (the real /dev/kvm)."""
    if name == "host":
        reason = host.available()
        if reason:
            raise RuntimeError(f"the host backend is unavailable: {reason}")
        return host
    if name != "sim":
        raise ValueError(f"backend must be one of {BACKENDS}, not {name!r}")
    return importlib.import_module("kvmlab.sys")


class Workbench:
    """Guest source on a one-vCPU Machine, stepped and watched; see the module docstring."""

    def __init__(
        self,
        source: str = DEFAULT_SOURCE,
        *,
        mode: str = "real",
        backend: str = "sim",
        entry: int = ENTRY,
        ram_size: int = RAM_SIZE,
    ) -> None:
        self.source = source
        self.mode = mode
        self.backend = backend
        self.entry = entry
        self.ram_size = ram_size
        self.program: Program | None = None
        self.asm_error: AsmError | None = None
        self.machine: Machine | None = None
        self.errors: list[WorkbenchError] = []
        self.history: list[Entry] = []
        self.view = View()
        self.breakpoints: set[int] = set()
        self.running = False
        self.listeners: list[Callable[[], None]] = []  # called after each action ends
        self._lock = threading.RLock()
        self._shadow: RamShadow | None = None
        self._debug_control: int | None = None  # what KVM_SET_GUEST_DEBUG last set
        self._owed = False  # KVM owes the completion of an IO/MMIO exit (next KVM_RUN does it)
        self._counts: Counter[str] = Counter()  # exit_counts() so far, up to log position
        self._counted = 0
        self._run_thread: threading.Thread | None = None
        self._stepping = False  # a synchronous KVM_RUN is under way (the watchdog may kick it)
        self._tracer = Tracer()
        self._watchdog = Watchdog(self._step_timed_out)

    # --- errors -----------------------------------------------------------------------------

    def report(self, source: str, error: BaseException | str, line: int | None = None) -> None:
        """Keep an error for the view; exceptions are kept with their type."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.errors.append(WorkbenchError(source, text, line))

    def clear_errors(self) -> None:
        self.errors.clear()

    # --- settings -----------------------------------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """Choose the CPU mode ("real", "protected", "long"); takes effect at the next assemble."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode

    def set_backend(self, name: str) -> None:
        """Choose "sim" or "host"; takes effect at the next assemble."""
        backend(name)  # fails now if the host has no /dev/kvm
        self.backend = name

    # --- assemble and reset -----------------------------------------------------------------

    def assemble(self) -> bool:
        """Assemble the source and boot it on a fresh machine; False (and an error) on failure."""
        self._not_running()
        try:
            program = assemble(self.source, mode=ASM_MODES[self.mode], base=self.entry)
        except AsmError as e:
            self.asm_error = e
            self.report("assembler", e.message, e.line)
            return False
        except (ValueError, RuntimeError) as e:
            self.report("assembler", e)
            return False
        self.asm_error = None
        self.program = program
        for warning in program.warnings:
            self.report("assembler", f"warning: {warning.message}", warning.line)
        self.close()
        try:
            k = backend(self.backend)
            if self.backend == "sim":  # after the import: subscribing wraps what is loaded
                self._tracer.subscribe()
            self._tracer.start()
            m = Machine(k, ram_size=self.ram_size)
            self.machine = m
            m.boot(program.code, mode=self.mode, entry=self.entry)
        except (OSError, RuntimeError, ValueError) as e:
            self.report("workbench", e)
            self.close()
            return False
        self._shadow = RamShadow(m)
        self._counts, self._counted = Counter(), 0
        self.history.clear()
        self.breakpoints.clear()
        self._debug_control = None
        self._owed = False
        regs, sregs = self._read_registers()
        self.view = View("assemble", regs, sregs, regs, sregs, self._run_area(), None, {})
        rec = self._tracer.take()
        self.view.trace = rec.tree() if rec is not None else ""
        self._notify()
        return True

    def reset(self) -> None:
        """Machine reset: boot registers, the program reloaded, devices reset (undoable)."""
        m = self._require()

        def reset() -> None:
            self._settle()
            m.reset()

        self._act("reset", reset)

    # --- stepping -----------------------------------------------------------------------------

    def step_kvm_run(self) -> None:
        """One KVM_RUN to the next exit, and the VMM's handling of it (breakpoints armed)."""
        self._act("step KVM_RUN", self._kvm_run_once, redo=self._kvm_run_once)

    def step_instruction(self) -> None:
        """One KVM_RUN with KVM_GUESTDBG_SINGLESTEP: KVM_EXIT_DEBUG after one instruction (an
        IO or MMIO instruction exits for its access first, and traps on the next KVM_RUN)."""
        self._act("step instruction", self._single_step, redo=self._single_step)

    def serial_input(self, text: str) -> None:
        """Type `text` into COM1's receive buffer (undoable)."""
        data = text.encode()

        def feed() -> None:
            self._require().serial.feed(data)

        self._act("serial input", feed, redo=feed)

    def _kvm_run_once(self) -> None:
        m = self._require()
        if self._step_over_breakpoint(m):
            self._arm_breakpoints()
            self._timed_step(m)

    def _step_over_breakpoint(self, m: Machine) -> bool:
        """A hardware breakpoint fires before its instruction: at one, single-step it first,
        as gdb does. False if that step ended in another exit (which is then the result)."""
        if self.linear_rip() not in self.breakpoints:
            return True
        self._set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
        record = self._timed_step(m)
        self.view.regs, self.view.sregs = self._read_registers()
        return record is not None and record.reason == "DEBUG"

    def _single_step(self) -> None:
        self._set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP)
        self._timed_step(self._require())

    def _timed_step(self, m: Machine) -> Any:
        """Machine.step(), kicked after STEP_TIMEOUT (a guest that loops without exits)."""
        cpu = m.cpus[0]
        with m.bql:
            self._stepping = True
        self._watchdog.arm(STEP_TIMEOUT)
        try:
            record = m.step()
        finally:
            self._watchdog.disarm()
            with m.bql:
                self._stepping = False
        if record is not None and record.reason == "INTR":
            self.report("guest", f"KVM_RUN gave no exit within {STEP_TIMEOUT} s: kicked")
        self._after_kvm_run(m)
        self._owed = int(cpu.kvm_run.exit_reason) in (KVM_EXIT_IO, KVM_EXIT_MMIO)
        return record

    def _step_timed_out(self) -> None:
        m = self.machine
        if m is not None:
            with m.bql:
                if self._stepping:
                    cpu_exit(m.cpus[0])

    def _after_kvm_run(self, m: Machine) -> None:
        """Report a stopped machine; let a debug stop run on, as a debugger resumes the VM."""
        cpu = m.cpus[0]
        if m.state == "internal-error":
            self.report("guest", cpu.last_error or "the vCPU stopped")
        elif m.state == "shutdown":
            self.report("guest", f"the guest wrote the exit device: code {m.exit_code}")
        with m.bql:
            if m.state == "debug":  # a debugger continues the VM
                m.vm_start()
            cpu.stop = cpu.exit_request = False  # a Stop's kick that came after the exit
            cpu.kvm_run.immediate_exit = 0

    # --- breakpoints and guest debug ----------------------------------------------------------

    def toggle_breakpoint(self, line: int) -> bool:
        """Set or clear a hardware breakpoint on source `line`; True if it is now set."""
        address = self._line_address(line)
        if address in self.breakpoints:
            self.breakpoints.discard(address)
            return False
        if len(self.breakpoints) >= MAX_BREAKPOINTS:
            raise ValueError(f"x86 has {MAX_BREAKPOINTS} hardware breakpoints (DR0-DR3)")
        self.breakpoints.add(address)
        return True

    def _line_address(self, line: int) -> int:
        if self.program is None:
            raise RuntimeError("assemble first")
        for entry in self.program.lines:
            if entry.line == line and entry.data:
                return entry.address
        raise ValueError(f"line {line} has no instruction")

    def _arm_breakpoints(self) -> None:
        if not self.breakpoints:
            self._set_guest_debug(0)
            return
        dr = [0] * 8
        for i, address in enumerate(sorted(self.breakpoints)):
            dr[i] = address
            dr[7] |= 1 << (2 * i)  # Ln: local enable; R/W and LEN 0 = instruction execution
        self._set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, dr)

    def _set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        key = hash((control, tuple(debugreg or ())))
        if self._debug_control == key:
            return
        cpu = self._require().cpus[0]
        dbg = kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg or ()):
            dbg.arch.debugreg[i] = value
        cpu.k.ioctl(cpu.kvm_fd, KVM_SET_GUEST_DEBUG, dbg)
        self._debug_control = key

    # --- run and stop -------------------------------------------------------------------------

    def run(self, max_exits: int = 1_000_000, timeout: float = RUN_TIMEOUT) -> None:
        """Run the vCPU on a background thread until it halts, stops, or `stop()` is called
        (at the latest after `timeout` seconds); listeners are told when it ends."""
        m = self._require()
        with self._lock:
            self._not_running()
            entry = self._begin("run")
            self._settle()
            self._arm_breakpoints()
            self.running = True
            self._tracer.unsubscribe()  # a traced Run would crawl; the trace shows steps
        started = time.monotonic()

        def body() -> None:
            timer = threading.Timer(timeout, self._kick)
            timer.start()
            try:
                if self._step_over_breakpoint(m):
                    self._arm_breakpoints()
                    m.run(max_exits=max_exits)
            except Exception as e:  # a device model or handler bug: keep it for the view
                self.report("handler", e)
            finally:
                timer.cancel()
            with self._lock:
                try:
                    self._after_kvm_run(m)
                    self._owed = int(m.cpus[0].kvm_run.exit_reason) in (KVM_EXIT_IO, KVM_EXIT_MMIO)
                    self._settle()
                    if time.monotonic() - started >= timeout:
                        self.report("guest", f"Run stopped after {timeout} s")
                    self._end(entry, None)
                    if self.backend == "sim":
                        self._tracer.subscribe()
                finally:
                    self.running = False
            self._notify()

        self._run_thread = threading.Thread(target=body, name="workbench-run", daemon=True)
        self._run_thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Kick the vCPU out of a Run and wait for the run thread; True once it has ended."""
        thread = self._run_thread
        deadline = time.monotonic() + timeout
        while thread is not None and thread.is_alive():
            with self._lock:
                if self.running:
                    self._kick()
            thread.join(0.05)
            if time.monotonic() > deadline:
                self.report("workbench", "the vCPU did not leave KVM_RUN")
                return False
        return True

    def wait(self, timeout: float = 5.0) -> bool:
        """Wait for a Run to end by itself; False if it is still running."""
        if self._run_thread is not None:
            self._run_thread.join(timeout)
            return not self._run_thread.is_alive()
        return True

    def _kick(self) -> None:
        m = self.machine
        if m is not None and m.cpus:
            with m.bql:
                m.cpus[0].stop = True  # Machine.run returns after this kick
                cpu_exit(m.cpus[0])

    # --- back ---------------------------------------------------------------------------------

    def back(self) -> bool:
        """Undo the last action: registers, RAM, devices and the view as they were; False if
        there is nothing to undo."""
        m = self._require()
        self._not_running()
        if not self.history:
            return False
        assert self._shadow is not None
        self._settle()
        entry = self.history.pop()
        target = entry
        chain = [entry]
        if entry.pending:  # KVM's half-done exit cannot be set: redo from a settled point
            while self.history and chain[-1].pending:
                chain.append(self.history.pop())
            target = chain[-1]
        self._shadow.undo(entry.ram)
        for e in chain[1:]:
            self._shadow.undo(e.ram)
        self._load(m, target)
        self._counted = -1  # the log was cut back: count again
        self._debug_control = None
        self._owed = False
        for e in reversed(chain[1:]):  # redo each action, keeping its history entry
            self.history.append(e)
            assert e.redo is not None
            e.redo()
            e.ram, _ = self._shadow.changes()
        if chain[1:]:
            load_machine(m, entry.machine)  # the devices exactly as they were
        self.view = entry.view
        self._notify()
        return True

    def _load(self, m: Machine, entry: Entry) -> None:
        cpu = m.cpus[0]
        load_machine(m, entry.machine)
        cpu.regs = kvm_regs.from_buffer_copy(entry.machine.regs)
        cpu.sregs = kvm_sregs.from_buffer_copy(entry.machine.sregs)
        kvm_cpu_synchronize_post_reset(cpu)
        area = entry.view.run_area
        if area:
            start = kvm_run.exit_reason.offset  # KVM_RUN's inputs before it stay as they are
            cpu.kvm_run_map[start : kvmrun.SHOWN_SIZE] = area[start : kvmrun.SHOWN_SIZE]
            cpu.kvm_run_map[0x1000:0x2000] = area[0x1000:0x2000]

    # --- the action frame ---------------------------------------------------------------------

    def _act(
        self,
        name: str,
        action: Callable[[], Any],
        redo: Callable[[], None] | None = None,
    ) -> None:
        """Do `action` as one undoable step: history entry, trace, errors, new view."""
        with self._lock:
            self._not_running()
            self._require()
            entry = self._begin(name, redo)
            self._tracer.start()
            try:
                action()
            except (OSError, RuntimeError, ValueError) as e:
                self.report("workbench", e)
            except Exception as e:  # a device model or exit handler failed
                self.report("handler", e)
            self._end(entry, self._tracer.take())
        self._notify()

    def _begin(self, name: str, redo: Callable[[], None] | None = None) -> Entry:
        m = self._require()
        entry = Entry(self.view, save_machine(m, self.view.regs, self.view.sregs), False, redo)
        entry.pending = self._pending()
        self.history.append(entry)
        self.view = View(name, self.view.regs, self.view.sregs)  # rip for the breakpoint check
        return entry

    def _end(self, entry: Entry, rec: trace.Recording | None) -> None:
        assert self._shadow is not None
        entry.ram, new = self._shadow.changes()
        regs, sregs = self._read_registers()
        changed = {}
        for gpa, old in entry.ram.pages.items():
            for i, (a, b) in enumerate(zip(old, new[gpa], strict=True)):
                if a != b:
                    changed[gpa + i] = old[i : i + 1]
        before = entry.view
        self.view = View(
            self.view.action,
            regs,
            sregs,
            before.regs,
            before.sregs,
            self._run_area(),
            before.run_area or None,
            changed,
            rec.tree() if rec is not None else "",
        )

    # --- machine plumbing ---------------------------------------------------------------------

    def _require(self) -> Machine:
        if self.machine is None:
            raise RuntimeError("assemble the program first")
        return self.machine

    def _not_running(self) -> None:
        if self.running:
            raise RuntimeError("the guest is running: Stop it first")

    def _pending(self) -> bool:
        """After an IO or MMIO exit KVM completes the instruction on the next KVM_RUN."""
        return self._owed

    def _settle(self) -> None:
        """Let KVM finish a half-done IO/MMIO instruction now: KVM_RUN with immediate_exit,
        which completes it and returns EINTR (what QEMU does when it pauses a vCPU)."""
        if not self._pending():
            return
        m = self._require()
        cpu = m.cpus[0]
        self._set_guest_debug(0)  # no single-step trap after the completed instruction
        cpu.kvm_run.immediate_exit = 1
        try:
            cpu.k.ioctl(cpu.kvm_fd, KVM_RUN, 0)
        except OSError as e:
            if e.errno not in (errno.EINTR, errno.EAGAIN):
                raise
        finally:
            cpu.kvm_run.immediate_exit = 0
        self._owed = False

    def _read_registers(self) -> tuple[bytes, bytes]:
        cpu = self._require().cpus[0]
        kvm_arch_get_registers(cpu)
        return bytes(cpu.regs), bytes(cpu.sregs)

    def _run_area(self) -> bytes:
        cpu = self._require().cpus[0]
        return bytes(cpu.kvm_run_map[:0x2000])

    def _notify(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception as e:  # a view's bug must not lose the model's state
                self.report("callback", e)

    def close(self) -> None:
        """Stop a Run, end the trace subscription and give the machine's fds and memory back."""
        self.stop()
        self._tracer.unsubscribe()
        if self.machine is not None:
            self.machine.close()
            self.machine = None

    # --- what the panels read -----------------------------------------------------------------

    def registers(self) -> list[tuple[str, int, bool]]:
        """(name, value, changed by the last action) for the general registers, rip, rflags."""
        now = kvm_regs.from_buffer_copy(self.view.regs)
        before = kvm_regs.from_buffer_copy(self.view.prev_regs)
        return [(n, getattr(now, n), getattr(now, n) != getattr(before, n)) for n in GPRS]

    def segments(self) -> list[tuple[str, dict[str, int], bool]]:
        """(name, fields, changed) for cs..ldt, then gdt/idt and the control registers."""
        now = kvm_sregs.from_buffer_copy(self.view.sregs)
        before = kvm_sregs.from_buffer_copy(self.view.prev_sregs)
        rows = []
        for name in (*SEGMENT_NAMES, "gdt", "idt"):
            a, b = getattr(now, name), getattr(before, name)
            fields = {f[0]: getattr(a, f[0]) for f in type(a)._fields_ if "padding" not in f[0]}
            rows.append((name, fields, bytes(a) != bytes(b)))
        for name in CONTROL:
            value = getattr(now, name)
            rows.append((name, {"value": value}, value != getattr(before, name)))
        return rows

    def kvm_run(self) -> kvmrun.KvmRunView | None:
        """struct kvm_run at the last exit, decoded; `changed` is against the exit before."""
        if not self.view.run_area:
            return None
        return kvmrun.decode(self.view.run_area, self.view.prev_run_area)

    def exit_counts(self) -> Counter[str]:
        """Handled exits per reason (what `stat.exits` counts, split by reason); counted
        incrementally, so that Run mode's refreshes stay cheap."""
        m = self.machine
        if m is None:
            return Counter()
        log = m.exit_log
        position = log.dropped + len(log)
        new = position - self._counted
        if new < 0 or new > len(log):
            self._counts, new = Counter(), len(log)
        self._counts.update(r.reason for r in log.records[len(log) - new :])
        self._counted = position
        return Counter(self._counts)

    def exit_timeline(self, last: int = 50) -> list[Any]:
        m = self.machine
        return list(m.exit_log.records[-last:]) if m is not None else []

    def linear_rip(self) -> int:
        regs = kvm_regs.from_buffer_copy(self.view.regs)
        sregs = kvm_sregs.from_buffer_copy(self.view.sregs)
        if sregs.efer & X86_EFER_LMA:
            return int(regs.rip)
        return int((sregs.cs.base + regs.rip) & 0xFFFFFFFF)

    def cpu_mode_bits(self) -> str:
        """The Capstone mode of the code at rip: "16", "32" or "64" from CS and EFER.LMA."""
        sregs = kvm_sregs.from_buffer_copy(self.view.sregs)
        if sregs.efer & X86_EFER_LMA and sregs.cs.l:
            return "64"
        return "32" if sregs.cs.db else "16"

    def disassembly(self, before: int = 4, after: int = 8) -> list[tuple[Any, bool, int | None]]:
        """(instruction, is the current one, source line) around rip, decoded from guest RAM.

        Decoding starts at the program's base when rip is inside it, so instructions align
        with the listing; elsewhere it starts at rip.
        """
        m = self.machine
        if m is None:
            return []
        sregs = kvm_sregs.from_buffer_copy(self.view.sregs)
        linear = self.linear_rip()
        gpa = x86_translate(sregs, linear, m.memory_read)
        if gpa is None:
            return []
        program = self.program
        start = gpa
        if program is not None and program.base <= gpa < program.base + max(len(program.code), 1):
            start = program.base
        length = min(gpa - start + 16 * (after + 1), self.ram_size - start)
        code = m.memory_read(start, length) or b""
        insns = disassemble(code, mode=self.cpu_mode_bits(), base=start)
        here = next((i for i, insn in enumerate(insns) if insn.address == gpa), None)
        if here is None:
            insns = disassemble(
                m.memory_read(gpa, 16 * after) or b"", mode=self.cpu_mode_bits(), base=gpa
            )
            here = 0
        window = insns[max(here - before, 0) : here + after]
        line_at = program.line_at if program is not None else (lambda address: None)
        return [(insn, insn.address == gpa, line_at(insn.address)) for insn in window]

    def memory(
        self, start: int | None = None, length: int = 0x100
    ) -> list[tuple[int, bytes, set[int]]]:
        """Rows of 16 bytes from `start` (default: the program's base): (gpa, bytes, indexes
        of the bytes the last action changed)."""
        m = self.machine
        if m is None:
            return []
        if start is None:
            start = self.program.base if self.program is not None else 0
        start &= ~0xF
        rows = []
        for address in range(start, min(start + length, self.ram_size), 16):
            data = m.memory_read(address, 16) or b""
            changed = {i for i in range(16) if address + i in self.view.ram_changed}
            rows.append((address, data, changed))
        return rows

    def changed_ranges(self) -> list[tuple[int, int]]:
        """(gpa, length) runs of the bytes the last action changed."""
        runs: list[tuple[int, int]] = []
        for address in sorted(self.view.ram_changed):
            if runs and runs[-1][0] + runs[-1][1] == address:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((address, 1))
        return runs

    def memory_map(self) -> list[tuple[str, int, int, str]]:
        """(kind, start, size, what): memory slots, then port and MMIO devices."""
        m = self.machine
        if m is None:
            return []
        rows = [(f"slot {b.slot}", b.gpa, b.size, "RAM") for b in m.ram_blocks]
        rows += [("port", x.base, x.length, x.device.name) for x in m.io.mappings]
        rows += [("mmio", x.base, x.length, x.device.name) for x in m.mmio.mappings]
        return rows

    def serial_text(self) -> str:
        m = self.machine
        if m is None:
            return ""
        return m.serial.text() + m.debugcon.text()

    def listing(self) -> list[tuple[int, str, int, bytes, str | None]]:
        """(line, text, address, bytes, flag) per source line; flag is a warning, or the note
        of a line kvmlab encoded itself because Keystone's bytes do not round-trip."""
        if self.program is None:
            return []
        warnings = {w.line: w.message for w in self.program.warnings}
        return [
            (ln.line, ln.text, ln.address, ln.data, warnings.get(ln.line) or ln.note)
            for ln in self.program.lines
        ]

    def current_line(self) -> int | None:
        """The source line of the instruction at rip."""
        if self.program is None:
            return None
        return self.program.line_at(self.linear_rip())
