"""The "hardware" under the simulated x86 KVM: one Unicorn CPU per vCPU, in the role VMX plays.

`UcVcpu.vcpu_run()` is kvmlab's `vmx_vcpu_run`: it enters the guest (Unicorn `emu_start`) and
comes back with a hardware exit reason, numbered like VMX's basic exit reasons so that
`handle_exit` in x86.py can dispatch the way `kvm_vmx_exit_handlers[]` does.

Why the engine always runs with an instruction count: Unicorn honours a stop request from an
IN/OUT hook at the next instruction boundary only when a count is set, so the guest stops
exactly after the IO instruction, as a VM exit would (docs/engine.md).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import mmap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TB_FLUSH,
    UC_CTL_TLB_FLUSH,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_OK,
    UC_ERR_WRITE_PROT,
    UC_HOOK_CODE,
    UC_HOOK_EDGE_GENERATED,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MEM_READ,
    UC_MODE_64,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
    UcError,
)
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import (
    UC_X86_INS_CPUID,
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
)

from kvmlab.kernel.arch.x86.cpu_state import (
    EXCP_VMEXIT,
    INTERCEPT_CR8,
    INTERCEPT_MSR_PROT,
    SVM_EXIT_MSR,
    SVM_EXIT_READ_CR8,
    SVM_EXIT_WRITE_CR8,
    VMCB_MSRPM_BASE_PA,
    RegBatch,
    X86CpuState,
)
from kvmlab.kernel.arch.x86.uc_events import (
    WITH_ERROR_CODE,
    Event,
    UnsupportedDeliveryError,
    deliver,
)
from kvmlab.kernel.memslots import PAGE_SIZE, KvmMemslots
from kvmlab.kernel.trace import traced
from kvmlab.kernel.uaccess import copy_from_user
from kvmlab.kernel.uc_stage2 import PAGE_MASK, UcStage2

# VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h), reused as the engine's exit codes.
EXIT_REASON_EXCEPTION_NMI = 0
EXIT_REASON_EXTERNAL_INTERRUPT = 1
EXIT_REASON_TRIPLE_FAULT = 2
EXIT_REASON_INTERRUPT_WINDOW = 7
EXIT_REASON_HLT = 12
EXIT_REASON_CR_ACCESS = 28  # MOV to or from CR8: the TPR, which KVM keeps
EXIT_REASON_IO_INSTRUCTION = 30
EXIT_REASON_MSR_READ = 31
EXIT_REASON_MSR_WRITE = 32
EXIT_REASON_MONITOR_TRAP_FLAG = 37  # a counted run of one instruction retired it
EXIT_REASON_DELIVERY_UNSUPPORTED = -1  # kvmlab's CPU cannot deliver this event (see uc_events)
EXIT_REASON_EFAULT = -2  # the host memory behind a slot is gone: KVM_RUN fails with EFAULT
EXIT_REASON_WRITE_PROTECTED = -3  # handled inside vcpu_run; never seen by KVM
EXIT_REASON_RETRY = -4  # a new MMIO page was mapped: run the instruction again
BP_VECTOR = 3
X86_RFLAGS_IF = 1 << 9
X86_RFLAGS_RF = 1 << 16
X86_CR0_PE_ONLY = 1  # protected mode, no paging: addresses are physical
EXIT_REASON_EPT_VIOLATION = 48  # no memory behind a fetch: KVM's emulator gives up
EXIT_REASON_EPT_MISCONFIG = 49  # an access to a GPA with no slot: MMIO, as KVM marks it

VMX_EXIT_NAMES = {
    value: name.removeprefix("EXIT_REASON_")
    for name, value in dict(globals()).items()
    if name.startswith("EXIT_REASON_") and isinstance(value, int)
}
RUN_FOREVER = 1 << 62  # the count that keeps Unicorn's per-instruction exit check armed
# A private VMCB and its MSR permission map (every MSR intercepted), in CPU-physical memory
# above anything a memslot can reach (52-bit guest-physical addresses at most).
VMCB_ADDR = 1 << 52
VMCB_SIZE = 3 * PAGE_SIZE
_VMCB = mmap.mmap(-1, VMCB_SIZE)  # read only by the CPU, so one serves every vCPU
_VMCB[VMCB_MSRPM_BASE_PA : VMCB_MSRPM_BASE_PA + 8] = (VMCB_ADDR + PAGE_SIZE).to_bytes(8, "little")
_VMCB[PAGE_SIZE:] = b"\xff" * 2 * PAGE_SIZE
_VMCB_HVA = ctypes.addressof(ctypes.c_char.from_buffer(_VMCB))
_REP_PREFIXES = (0xF2, 0xF3)
_REP_WRITES = frozenset({0xA4, 0xA5, 0xAA, 0xAB, 0x6E, 0x6F})  # MOVS, STOS, OUTS
_PREFIXES = frozenset(
    [0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0, *range(0x40, 0x50)]
)
_emu_start = uclib.uc_emu_start
_emu_start.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
_emu_start.argtypes += [ctypes.c_size_t]
_emu_stop = uclib.uc_emu_stop


def engine_address(uc: Uc) -> int:
    """The address of the engine's uc_struct (the handle every uc_* call takes)."""
    handle = uc._uch.value if uc._uch is not None else None
    if not handle:
        raise RuntimeError("the Unicorn engine is closed")
    return int(handle)


def close_engine(uc: Uc) -> None:
    """uc_close now, with the vCPU, rather than whenever Python's cycle collector runs.

    The binding's hook wrappers and the engine refer to each other, so an engine that had
    hooks is otherwise freed by a garbage collection, long after its VM and in bulk with
    others: its memory is then scattered among newer objects and the C heap keeps growing
    (RSS +25 to +35 MiB over 10,000 VM lifetimes, benchmarks/lifetimes.py). The handle is zeroed
    in place, so the binding's own finalizer finds nothing left to close; the engine must
    not be used again.
    """
    handle = uc._uch
    if handle:
        uclib.uc_close(handle)
        handle.value = None


@functools.cache
def emu_count_offset() -> int:
    """Where uc_struct keeps the instruction budget of the current run (`emu_count`).

    Found once per process: a scratch engine runs with a marker budget and looks for it in its
    own uc_struct, read safely with copy_from_user; then a budget cut to zero from inside a
    run must stop it at the next instruction. A Unicorn that does not pass fails here loudly.
    """
    marker = 0x5A5A_5A5A_1234_5678
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    uc.mem_map(0, PAGE_SIZE)
    uc.mem_write(0x100, b"\x90" * 8 + b"\xf4")  # nop x 8; hlt
    handle = engine_address(uc)
    found: list[int] = []

    def look(uc: Uc, address: int, size: int, _ud: object) -> None:
        if address == 0x100:
            words = copy_from_user(handle, 0x4000)
            found.extend(o for o in range(0, len(words), 8) if words[o : o + 8] == marker_bytes)
        elif address == 0x102 and len(found) == 1:
            ctypes.c_uint64.from_address(handle + found[0]).value = 0

    marker_bytes = marker.to_bytes(8, "little")
    uc.hook_add(UC_HOOK_CODE, look, None, 0x100, 0x102)
    uc.emu_start(0x100, 0, count=marker)
    if len(found) != 1 or uc.reg_read(UC_X86_REG_RIP) != 0x103:
        raise RuntimeError(f"kvmlab cannot find Unicorn's instruction budget {found}")
    return found[0]


@functools.cache
def halted_flag_offsets() -> tuple[int, int]:
    """Where Unicorn keeps its CPU's `halted` flag: (offset of the CPUState pointer in
    uc_struct, offset of `halted` in CPUState).

    Found once per process, as emu_count_offset is: a scratch engine stops after a `nop` (not
    halted) or on a `hlt` (halted) in an irregular order, and the one 32-bit word behind a
    uc_struct pointer that follows that order every time is the flag. Words that merely
    change (another thread's heap, counters) drop out; a Unicorn where the flag is not unique
    fails here loudly.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, PAGE_SIZE)
    uc.mem_write(0x100, b"\x90\xf4")  # nop; hlt: a count of 1 stops after the nop, 2 on the hlt
    handle = engine_address(uc)
    struct_bytes = copy_from_user(handle, 0x1000)
    pointers = {
        offset: int.from_bytes(struct_bytes[offset : offset + 8], "little")
        for offset in range(0, len(struct_bytes), 8)
    }
    pointers = {o: p for o, p in pointers.items() if 1 << 20 < p < 1 << 47 and not p % 8}

    def snapshot(count: int) -> dict[int, bytearray]:
        uc.emu_start(0x100, 0, count=count)
        regions = {}
        for offset, pointer in pointers.items():
            with contextlib.suppress(OSError):  # not every word is a pointer to readable memory
                regions[offset] = copy_from_user(pointer, 0x10000)
        return regions

    running, halted = snapshot(1), snapshot(2)
    found = []
    for offset in running.keys() & halted.keys():
        if running[offset] != halted[offset]:
            words = array.array("I", running[offset]), array.array("I", halted[offset])
            pairs = zip(*words, strict=True)
            found += [(offset, 4 * i) for i, pair in enumerate(pairs) if pair == (0, 1)]
    for count in (1, 2, 2, 1, 1, 2, 1, 2, 2, 1):
        uc.emu_start(0x100, 0, count=count)
        found = [
            (offset, at)
            for offset, at in found
            if int.from_bytes(copy_from_user(pointers[offset] + at, 4), "little") == count - 1
        ]
    if len(found) != 1:
        raise RuntimeError(f"kvmlab cannot find Unicorn's CPUState.halted {found}")
    return found[0]


@dataclass(slots=True)
class IoExit:
    """The exit qualification of an IO instruction (VMX packs the same facts in 64 bits)."""

    port: int = 0
    size: int = 0
    is_in: bool = False
    string: bool = False
    rep: bool = False
    value: int = 0  # OUT: the value written
    insn_rip: int = 0  # the IO instruction
    next_rip: int = 0  # the instruction after it (for INS: not yet known)
    rax: int = 0  # IN: rax before the instruction
    prefixes: bytes = b""  # string IO: the prefix bytes before the opcode


@dataclass(slots=True)
class MmioAccess:
    """One guest access to MMIO: what KVM_EXIT_MMIO reports."""

    gpa: int
    size: int
    is_write: bool
    data: bytes  # write: the bytes stored; read: the bytes to load (after userspace filled them)


class UcVcpu:
    """One vCPU's Unicorn instance: its memory view, its hooks, and one guest entry at a time."""

    def __init__(self) -> None:
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._h = engine_address(uc)
        emu_count_offset()  # probe before any kick can need it
        self.cpu = X86CpuState(uc)
        self.exit_reason = EXIT_REASON_EXTERNAL_INTERRUPT
        self.io = IoExit()
        self.exception_vector = 0
        self.rip = 0  # where the guest stopped
        self.rflags = 0
        self._exit_pending = False
        self.kick_requested = False
        self._lock = threading.Lock()
        self.running = False
        self.kickable = True  # may a kick cut the current run short?
        self.stage2 = UcStage2(uc)  # the guest-physical memory this CPU sees (EPT's part)
        self._out_hook = RegBatch(uc, [UC_X86_REG_RIP, UC_X86_REG_RSI])
        self._in_hook = RegBatch(uc, [UC_X86_REG_RIP, UC_X86_REG_RAX])
        self._after = RegBatch(uc, [UC_X86_REG_RIP, UC_X86_REG_RSI, UC_X86_REG_RFLAGS])
        self._rsi_in_hook = 0
        self.mmio = MmioAccess(0, 0, False, b"")
        # Replay of the current instruction's MMIO accesses (see mmio_complete_read).
        self.replaying = False
        self._reads: list[MmioAccess] = []
        self._writes: list[MmioAccess] = []
        self._read_idx = 0
        self._write_idx = 0
        self._window = MmioAccess(0, 0, False, b"")
        self.intercept_bp = False  # KVM_GUESTDBG_USE_SW_BP: #BP exits instead of being delivered
        self._invalid_opcode = False
        self.mmio_insn_rip = 0  # the instruction of the last MMIO write
        self.pending_writes: list[MmioAccess] = []
        self.debug_dr6 = 0  # DR6 of the last #DB the CPU raised for a hardware breakpoint
        self._breakpoint_hooks: list[int] = []
        self.intercepted_db = False
        self._write_fault: tuple[str, int] | None = None  # ("dirty" | "readonly", gpa)
        self.unsupported = ""
        # kvm_emulate_cpuid: the vCPU's table answers (KVM installs it); zeros until then.
        self.cpuid: Callable[[int, int], tuple[int, int, int, int]] = lambda fn, idx: (0,) * 4
        self._cpuid_in = RegBatch(uc, [UC_X86_REG_RAX, UC_X86_REG_RCX])
        self.msr_write = False  # the MSR exit's direction
        self.cr_write = False  # the CR8 exit's direction
        uc.mem_map_ptr(VMCB_ADDR, VMCB_SIZE, UC_PROT_READ, _VMCB_HVA)
        self.cpu.enable_intercepts(VMCB_ADDR, INTERCEPT_MSR_PROT, INTERCEPT_CR8)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_EDGE_GENERATED, self._on_edge)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_write_prot)

    def close(self) -> None:
        """Free the engine now (see close_engine) and the aliases of the slots' memory."""
        close_engine(self.uc)
        self.stage2.close()

    # --- memory -------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The memslots generation the engine's memory was last built from."""
        return self.stage2.generation

    def backing_intact(self) -> bool:
        """Is the host memory behind the guest's memory still there? (see UcStage2)"""
        return self.stage2.backing_intact()

    def invalidate_stale_code(self) -> None:
        """Drop translations of guest code the host rewrote (see UcStage2)."""
        self.stage2.invalidate_stale_code()

    def load_memslots(self, slots: KvmMemslots) -> None:
        """Make Unicorn's physical memory match the VM's slots (only what changed is remapped)."""
        with self._paging_off():
            self.stage2.load_memslots(slots)

    @contextlib.contextmanager
    def _paging_off(self) -> Iterator[None]:
        """Unicorn invalidates code by walking the guest's page tables on every (un)map; those
        tables may live in memory that is going away, so the CPU is made flat meanwhile and
        put back exactly as it was (a raw context restore)."""
        saved = self.uc.context_save()
        self.uc.reg_write(UC_X86_REG_CR0, X86_CR0_PE_ONLY)
        try:
            yield
        finally:
            self.uc.context_restore(saved)
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def remember_code_at(self, linear: int) -> None:
        """Note the guest page of code at a linear address (through the guest's paging, if on)."""
        gpa = self.cpu.translate(linear & PAGE_MASK)
        if gpa is not None:
            self.stage2.remember_code_page(gpa)

    # --- hooks (called by Unicorn in the middle of emu_start) ---------------------------------

    def _stop(self, reason: int) -> None:
        self.exit_reason = reason
        self._exit_pending = True
        _emu_stop(self._h)

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _ud: object) -> None:
        rip, rsi = self._out_hook.read()
        io = self.io
        io.port, io.size, io.is_in, io.value, io.insn_rip = port, size, False, value, rip
        self._rsi_in_hook = rsi
        self._stop(EXIT_REASON_IO_INSTRUCTION)

    def _on_in(self, uc: Uc, port: int, size: int, _ud: object) -> int:
        rip, rax = self._in_hook.read()
        io = self.io
        io.port, io.size, io.is_in, io.value, io.insn_rip, io.rax = port, size, True, 0, rip, rax
        self._stop(EXIT_REASON_IO_INSTRUCTION)
        return 0

    def _on_interrupt(self, uc: Uc, intno: int, _ud: object) -> None:
        if intno == EXCP_VMEXIT + SVM_EXIT_MSR:  # RDMSR/WRMSR intercepted; rip is on it
            self.msr_write = bool(self.cpu.exception_error_code())
            self._stop(EXIT_REASON_MSR_WRITE if self.msr_write else EXIT_REASON_MSR_READ)
            return
        if intno in (EXCP_VMEXIT + SVM_EXIT_READ_CR8, EXCP_VMEXIT + SVM_EXIT_WRITE_CR8):
            self.cr_write = intno == EXCP_VMEXIT + SVM_EXIT_WRITE_CR8  # rip is on the MOV
            self._stop(EXIT_REASON_CR_ACCESS)
            return
        self.exception_vector, self._invalid_opcode = intno, False
        self._stop(EXIT_REASON_EXCEPTION_NMI)

    def _on_cpuid(self, uc: Uc, _ud: object) -> int:
        """CPUID: answered from KVM's table inside the run (no exit to userspace)."""
        fn, idx = self._cpuid_in.read()
        eax, ebx, ecx, edx = self.cpuid(fn & 0xFFFF_FFFF, idx & 0xFFFF_FFFF)
        cpu = self.cpu
        cpu.write_reg(UC_X86_REG_RAX, eax)
        cpu.write_reg(UC_X86_REG_RBX, ebx)
        cpu.write_reg(UC_X86_REG_RCX, ecx)
        cpu.write_reg(UC_X86_REG_RDX, edx)
        return 1  # skip QEMU's own cpuid

    def _on_invalid(self, uc: Uc, _ud: object) -> bool:
        self.exception_vector, self._invalid_opcode = 6, True  # #UD
        self._stop(EXIT_REASON_EXCEPTION_NMI)
        return True

    def _on_unmapped(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _ud: object
    ) -> bool:
        """A load or store where no slot is: make the page an MMIO page and retry the access.

        The page is served by `_mmio_read`, and a hook bounded to it, `_on_mmio`, sees each
        whole access (Unicorn splits the callbacks into 4-byte pieces; the hook gets the full
        size and value). The access fails here; vcpu_run flushes the translations and runs the
        instruction again. A fetch is reported as an EPT violation.
        """
        what = self.stage2.unmapped_access(
            access, addr, size, self._on_mmio, self._mmio_read, self._mmio_write
        )
        if what == "efault":  # a slot whose host memory is not mapped
            self._stop(EXIT_REASON_EFAULT)
        elif what == "mmio":
            self._stop(EXIT_REASON_RETRY)
        return False

    def _on_mmio(self, uc: Uc, access: int, addr: int, size: int, value: int, _ud: object) -> None:
        """Every access to an MMIO page: replayed from this instruction's log, or a new exit."""
        if access == UC_MEM_READ:
            reads = self._reads
            if self._read_idx < len(reads):
                done = reads[self._read_idx]
                if (done.gpa, done.size) == (addr, size):
                    self._read_idx += 1
                    self._window = done
                    return
            self._window = MmioAccess(addr, size, False, bytes(size))
            if not self._exit_pending:
                self.mmio = self._window
                self._stop(EXIT_REASON_EPT_MISCONFIG)
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        writes = self._writes
        if self._write_idx < len(writes):
            done = writes[self._write_idx]
            if (done.gpa, done.size, done.data) == (addr, size, data):
                self._write_idx += 1
                return
        if not self._exit_pending:
            self.mmio = MmioAccess(addr, size, True, data)
            self._stop(EXIT_REASON_EPT_MISCONFIG)

    def _on_write_prot(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _ud: object
    ) -> bool:
        """A store to a write-protected page: dirty logging's first write, or a READONLY slot.

        Protection cannot change while Unicorn runs, so the access fails here and vcpu_run
        deals with it between two emu_starts.
        """
        slot = self.stage2.slots.gfn_to_memslot(addr >> 12)
        if slot is not None and slot.readonly:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.mmio = MmioAccess(addr, size, True, data)
            self._write_fault = ("readonly", addr)
        elif slot is not None and slot.dirty_bitmap is not None:
            self._write_fault = ("dirty", addr)
        return False

    def _mmio_read(self, uc: Uc, offset: int, size: int, page: int) -> int:
        """Serve a piece of the current MMIO read from the bytes userspace supplied."""
        w = self._window
        start = page + offset - w.gpa
        piece = w.data[max(start, 0) : max(start + size, 0)]
        return int.from_bytes(piece, "little")

    def _mmio_write(self, uc: Uc, offset: int, size: int, value: int, page: int) -> None:
        """Stores are taken whole by _on_mmio; the pieces are dropped."""

    def mmio_complete_read(self, data: bytes) -> None:
        """KVM's complete_emulated_mmio for a read: the instruction re-runs with this data."""
        m = self.mmio
        self._reads.append(MmioAccess(m.gpa, m.size, False, data[: m.size]))
        self.replaying = True

    def _on_edge(self, uc: Uc, cur: object, prev: object, _ud: object) -> None:
        """A new jump between translated blocks: their pages hold translated code."""
        for tb in (cur, prev):
            pc, size = tb.pc, tb.size  # type: ignore[attr-defined]
            self.remember_code_at(pc)
            if (pc + size - 1) & PAGE_MASK != pc & PAGE_MASK:
                self.remember_code_at(pc + size - 1)

    # --- entering the guest -------------------------------------------------------------------

    def kick(self) -> None:
        """Force the vCPU out of the guest (an IPI on hardware), at an instruction boundary.

        uc_emu_stop from another thread can land after an instruction's store and roll the
        instruction back, so it would run twice (a `lock inc` counted twice). Instead the run's
        instruction budget is cut to zero: Unicorn's own per-instruction count check then stops
        before the next instruction.
        """
        with self._lock:
            self.kick_requested = True
            if self.running and self.kickable:  # else served once that instruction is done
                ctypes.c_uint64.from_address(self._h + emu_count_offset()).value = 0

    def inject(self, event: Event) -> int | None:
        """Deliver an event before the next instruction (VMX entry injection).

        Returns None when delivered, else the exit reason it ended in (a triple fault).
        """
        try:
            if deliver(self.cpu, event):
                return None
        except UnsupportedDeliveryError as e:
            self.unsupported = str(e)
            return EXIT_REASON_DELIVERY_UNSUPPORTED
        return EXIT_REASON_TRIPLE_FAULT

    def interrupts_allowed(self) -> bool:
        """IF set and no STI / MOV SS shadow: an external interrupt could be taken now."""
        return bool(self.cpu.read_reg(UC_X86_REG_RFLAGS) & X86_RFLAGS_IF) and not (
            self.cpu.interrupt_shadow()
        )

    @traced("vmx_vcpu_run", args=lambda self, rip, **_: {"rip": rip})
    def vcpu_run(
        self, rip: int, step: bool = False, irq_window: bool = False, retire_only: bool = False
    ) -> int:
        """Run the guest from `rip` until something needs the hypervisor; return the reason.

        With `step`, at most one instruction runs (MONITOR_TRAP_FLAG when it retired). With
        `irq_window`, the guest leaves as soon as it can take an interrupt (INTERRUPT_WINDOW),
        which kvmlab finds by stepping while interrupts are masked.
        """
        if self.pending_writes:  # the rest of a wide store, one exit each
            self.mmio = self.pending_writes.pop(0)
            self.rip = rip
            return self._set_reason(EXIT_REASON_EPT_MISCONFIG)
        while True:
            if irq_window and not self.replaying:
                self.cpu.set_rip(rip)
                if self.interrupts_allowed():
                    self.rip, self.rflags = rip, self.cpu.read_reg(UC_X86_REG_RFLAGS)
                    return self._set_reason(EXIT_REASON_INTERRUPT_WINDOW)
            counted = self.replaying or step or irq_window
            # a replayed MMIO read finishes its instruction before a kick is served
            reason = self._enter(rip, 1 if counted else RUN_FOREVER, not self.replaying)
            if reason == EXIT_REASON_RETRY:
                rip = self.rip
                continue
            if reason == EXIT_REASON_WRITE_PROTECTED:
                handled = self._write_protected(self.rip)
                if handled is None:
                    continue  # a dirty page noted and unprotected: retry the store
                return handled  # a READONLY slot's store, already retired
            if reason == EXIT_REASON_EXCEPTION_NMI:
                exit_reason = self._guest_exception()
                if exit_reason is not None:
                    return exit_reason
                rip = self.rip = self.cpu.rip
                continue
            if reason == EXIT_REASON_MONITOR_TRAP_FLAG and irq_window and not step:
                rip = self.rip  # one more masked instruction retired: look at IF again
                continue
            if reason == EXIT_REASON_EPT_MISCONFIG:
                if not self.mmio.is_write:
                    return reason  # a read: rip stays on the instruction until the data comes
                # A store: note it, then re-run the instruction with that store swallowed so
                # that it retires (rip past it), as KVM's emulator writes back before exiting.
                # Wider stores come in 8-byte pieces: collect them all, then report one per exit
                # (KVM's mmio_fragments), the first now, with rip past the instruction.
                writes = [self.mmio]
                rip = self.mmio_insn_rip = self.rip  # the store's instruction
                while True:
                    self._writes = list(writes)
                    again = self._enter(rip, 1, kickable=False)
                    if again != EXIT_REASON_EPT_MISCONFIG or not self.mmio.is_write:
                        break
                    writes.append(self.mmio)
                if again == EXIT_REASON_EPT_MISCONFIG:  # a load after the stores: finish later
                    self.mmio, self.rip, self.replaying = writes[0], rip, True
                    self._writes = writes
                    return EXIT_REASON_EPT_MISCONFIG
                self._end_replay()
                if again != EXIT_REASON_MONITOR_TRAP_FLAG:
                    return again
                self.mmio, self.pending_writes = writes[0], writes[1:]
                return EXIT_REASON_EPT_MISCONFIG
            if self.replaying:
                self._end_replay()
                if reason == EXIT_REASON_MONITOR_TRAP_FLAG and not step and not retire_only:
                    rip = self.rip  # the replayed instruction retired; carry on
                    continue
            return reason

    def _write_protected(self, rip: int) -> int | None:
        """After a store hit a write-protected page: log it dirty, or make it an MMIO write."""
        assert self._write_fault is not None
        kind, gpa = self._write_fault
        self._write_fault = None
        if kind == "dirty":
            self.stage2.mark_page_dirty(gpa)
            return None
        page = gpa & PAGE_MASK
        slot = self.stage2.slots.gfn_to_memslot(gpa >> 12)
        assert slot is not None
        # A READONLY slot: retire the instruction with the store thrown away (KVM emulates it
        # and exits with the data), by letting it write and putting the bytes back.
        write = self.mmio
        hva = slot.userspace_addr + (page - slot.gpa)
        saved = ctypes.string_at(hva, PAGE_SIZE)
        self.uc.mem_protect(page, PAGE_SIZE, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC)
        try:
            reason = self._enter(rip, 1, kickable=False)
        finally:
            ctypes.memmove(hva, saved, PAGE_SIZE)
            self.uc.mem_protect(page, PAGE_SIZE, UC_PROT_READ | UC_PROT_EXEC)
            self.uc.ctl_remove_cache(page, page + PAGE_SIZE)
        self.mmio = write
        if reason != EXIT_REASON_MONITOR_TRAP_FLAG:
            return reason
        return self._set_reason(EXIT_REASON_EPT_MISCONFIG)

    def _guest_exception(self) -> int | None:
        """The guest raised an exception: deliver it as the CPU would, unless KVM wants it."""
        vector = self.exception_vector
        if self.intercepted_db:  # a hardware breakpoint KVM asked for: before the instruction
            self.intercepted_db = False
            return EXIT_REASON_EXCEPTION_NMI
        software = not self._invalid_opcode and self.cpu.exception_is_int()
        insn_len = 0
        if software:  # rip is past INT n (CD xx), INT3 (CC) or INTO (CE)
            self.cpu.clear_exception_is_int()
            insn_len = 2 if self.cpu.read_code(self.rip - 2, 1) == b"\xcd" else 1
        if vector == BP_VECTOR and software and self.intercept_bp:
            self.rip = (self.rip - 1) & 0xFFFF_FFFF_FFFF_FFFF  # VMX exits on the int3 itself
            self.cpu.set_rip(self.rip)
            return EXIT_REASON_EXCEPTION_NMI
        code = None
        if vector in WITH_ERROR_CODE and not software:
            code = self.cpu.exception_error_code()
        return self.inject(Event(vector, code, software, insn_len))

    def set_hw_breakpoints(self, breakpoints: list[tuple[int, int]]) -> None:
        """Instruction breakpoints (DRn index, linear address): stop before that instruction."""
        for handle in self._breakpoint_hooks:
            self.uc.hook_del(handle)
        self._breakpoint_hooks = [
            self.uc.hook_add(UC_HOOK_CODE, self._on_breakpoint, index, address, address)
            for index, address in breakpoints
        ]
        self.uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)  # hooks are compiled into translations

    def _on_breakpoint(self, uc: Uc, address: int, size: int, index: int) -> None:
        self.exception_vector, self._invalid_opcode = 1, False
        self.debug_dr6 = 1 << index
        self.intercepted_db = True
        self._stop(EXIT_REASON_EXCEPTION_NMI)

    def prefixes_at(self, rip: int) -> tuple[bytes, int | None]:
        """The prefix bytes of the instruction at CS:rip and its first opcode byte."""
        code = self.cpu.read_code(rip, 15)
        n = 0
        while n < len(code) and code[n] in _PREFIXES:
            n += 1
        return code[:n], code[n] if n < len(code) else None

    def rep_string_at(self, rip: int) -> tuple[bytes, int] | None:
        """(prefixes, opcode) if the instruction at rip is a REP MOVS/STOS/OUTS, else None."""
        prefixes, opcode = self.prefixes_at(rip)
        if opcode in _REP_WRITES and any(b in _REP_PREFIXES for b in prefixes):
            assert opcode is not None
            return prefixes, opcode
        return None

    def _halted(self) -> bool:
        """Did the run end in HLT? (Unicorn's CPUState.halted, set by HLT, cleared per run.)"""
        cpu_pointer, halted = halted_flag_offsets()
        cpu = ctypes.c_uint64.from_address(self._h + cpu_pointer).value
        return ctypes.c_uint32.from_address(cpu + halted).value == 1

    def _end_replay(self) -> None:
        self.replaying = False
        self._reads.clear()
        self._writes.clear()

    def _enter(self, rip: int, count: int, kickable: bool = True) -> int:
        """One emu_start: from `rip`, for at most `count` instructions.

        A kick stays requested until a run ends because of it (or in HLT, which serves it): a
        run that ends in an exception, a fault or a replay instead leaves it for the next
        `kickable` entry, so a guest that faults again and again can still be kicked out.
        Entries that finish an instruction already begun (`kickable=False`) run regardless.
        """
        with self._lock:
            if self.kick_requested and kickable:
                self.kick_requested = False
                self.rip = rip
                return self._set_reason(EXIT_REASON_EXTERNAL_INTERRUPT)
            self.running, self.kickable = True, kickable
        self._exit_pending = False
        self._read_idx = self._write_idx = 0
        uc = self.uc
        try:
            err = _emu_start(self._h, rip, 0, 0, count)
        finally:
            with self._lock:
                self.running = False
                kicked = self.kick_requested
        if uc._hook_exception is not None:  # a hook raised: a kvmlab bug, not the guest's
            exc, uc._hook_exception = uc._hook_exception, None
            raise exc
        self.rip, rsi, self.rflags = self._after.read()
        if err != UC_ERR_OK:
            if err in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
                return self._set_reason(EXIT_REASON_EPT_VIOLATION)
            if err == UC_ERR_WRITE_PROT and self._write_fault is not None:
                return self._set_reason(EXIT_REASON_WRITE_PROTECTED)
            if self._exit_pending and self.exit_reason == EXIT_REASON_EFAULT:
                return EXIT_REASON_EFAULT
            if self._exit_pending and self.exit_reason == EXIT_REASON_RETRY:
                self.stage2.flush_code()
                return EXIT_REASON_RETRY
            raise UcError(err)
        if self._exit_pending:
            if self.exit_reason == EXIT_REASON_IO_INSTRUCTION:
                self._decode_io(rsi)
            return self.exit_reason
        # emu_start returned by itself: a kick, the end of a counted run, or HLT. A kick that
        # lands as HLT runs must not hide it: KVM reports the HLT; the kick is served by it.
        if kicked:
            with self._lock:
                self.kick_requested = False
            if not self._halted():
                return self._set_reason(EXIT_REASON_EXTERNAL_INTERRUPT)
        if self.rflags & X86_RFLAGS_RF:  # an instruction retired: the CPU clears RF (QEMU does not)
            self.rflags &= ~X86_RFLAGS_RF
            self.cpu.write_reg(UC_X86_REG_RFLAGS, self.rflags)
        if count == 1 and not self._halted():  # a step over HLT is a HLT exit, as in KVM
            return self._set_reason(EXIT_REASON_MONITOR_TRAP_FLAG)
        return self._set_reason(EXIT_REASON_HLT)

    def _set_reason(self, reason: int) -> int:
        self.exit_reason = reason
        return reason

    def _decode_io(self, rsi: int) -> None:
        """Tell string IO from plain IN/OUT by what the instruction did to the registers.

        OUTS moved RSI; INS was rolled back by Unicorn (its stop lands after the store), so rip
        did not move. Only then are the instruction bytes read, to find a REP prefix.
        """
        io = self.io
        if io.is_in:
            io.string = self.rip == io.insn_rip
        else:
            io.string = rsi != self._rsi_in_hook
        io.next_rip = self.rip
        io.rep = False
        if io.string:
            io.prefixes, _ = self.prefixes_at(io.insn_rip)
            io.rep = any(b in _REP_PREFIXES for b in io.prefixes)
