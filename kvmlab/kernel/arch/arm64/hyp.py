"""The "hardware" under the simulated arm64 KVM: one Unicorn AArch64 CPU per vCPU, at EL1.

`UcVcpu.vcpu_run()` plays `__kvm_vcpu_run`, the EL2 world switch: it runs the guest until
something traps to the hypervisor and returns an exception code (ARM_EXCEPTION_TRAP with the
syndrome in `esr`, or ARM_EXCEPTION_IRQ when the vCPU was kicked), as hardware reports it to
KVM. Exceptions the guest takes at EL1 itself (svc, brk, an undefined instruction, an IRQ) are
delivered here, since Unicorn leaves exception entry to its user.

Facts about Unicorn's AArch64 CPU this relies on (probed in tests/arm64):
- `hvc` traps as EXCP_HVC only with SCR_EL3.HCE set; it stops with pc after the `hvc`.
- `wfi` ends emu_start normally with pc after it; `wfe` is a no-op.
- An MMIO load stopped from a memory hook has pc back on the load but its destination
  register already written: the registers are snapshotted in the hook and put back.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from unicorn import (
    UC_ARCH_ARM64,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_OK,
    UC_HOOK_EDGE_GENERATED,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MEM_WRITE,
    UC_MODE_ARM,
    Uc,
    UcError,
)
from unicorn import arm64_const as uc_arm64
from unicorn.unicorn_py3.unicorn import uclib

from kvmlab.kernel.arch.x86.uc import (
    RUN_FOREVER,
    close_engine,
    emu_count_offset,
    engine_address,
)
from kvmlab.kernel.memslots import KvmMemslots
from kvmlab.kernel.trace import traced
from kvmlab.kernel.uc_stage2 import UcStage2
from kvmlab.uapi.arm64 import (
    PSR_A_BIT,
    PSR_D_BIT,
    PSR_F_BIT,
    PSR_I_BIT,
    PSR_MODE_MASK,
    PSR_MODE_EL1h,
    kvm_regs,
)

# Exception codes __kvm_vcpu_run returns (arch/arm64/include/asm/kvm_asm.h)
ARM_EXCEPTION_IRQ = 0
ARM_EXCEPTION_TRAP = 2
ARM_EXCEPTION_NAMES = {
    ARM_EXCEPTION_IRQ: "ARM_EXCEPTION_IRQ",
    ARM_EXCEPTION_TRAP: "ARM_EXCEPTION_TRAP",
}

# ESR_ELx: exception class (bits 31:26), instruction length (25), syndrome (24:0)
ESR_ELx_EC_SHIFT = 26
ESR_ELx_IL = 1 << 25
ESR_ELx_EC_UNKNOWN = 0x00
ESR_ELx_EC_WFx = 0x01
ESR_ELx_EC_SVC64 = 0x15
ESR_ELx_EC_HVC64 = 0x16
ESR_ELx_EC_SMC64 = 0x17
ESR_ELx_EC_IABT_LOW = 0x20
ESR_ELx_EC_DABT_LOW = 0x24
ESR_ELx_EC_BRK64 = 0x3C
ESR_ELx_ISV = 1 << 24
ESR_ELx_SAS_SHIFT = 22
ESR_ELx_SSE = 1 << 21
ESR_ELx_SRT_SHIFT = 16
ESR_ELx_SF = 1 << 15
ESR_ELx_AR = 1 << 14
ESR_ELx_WNR = 1 << 6
ESR_ELx_FSC_TRANS_L3 = 0x07  # a stage-2 translation fault: no memory slot there
EC_NAMES = {
    ESR_ELx_EC_WFx: "ESR_ELx_EC_WFx",
    ESR_ELx_EC_HVC64: "ESR_ELx_EC_HVC64",
    ESR_ELx_EC_SMC64: "ESR_ELx_EC_SMC64",
    ESR_ELx_EC_IABT_LOW: "ESR_ELx_EC_IABT_LOW",
    ESR_ELx_EC_DABT_LOW: "ESR_ELx_EC_DABT_LOW",
}

# Unicorn's (QEMU's) exception numbers in UC_HOOK_INTR
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_BKPT = 7
EXCP_HVC = 11
EXCP_SMC = 13

INSN_WFI = 0xD503207F
SCR_EL3 = (1, 1, 3, 6, 0)  # Unicorn's CP_REG tuple: (crn, crm, op0, op1, op2)
SCR_EL3_RW_HCE = 0x500  # EL1 is AArch64, and hvc is enabled (traps to the hypervisor)
SPSR_EL1 = (4, 0, 3, 0, 0)
SCTLR_EL1 = (1, 0, 3, 0, 0)
SCTLR_ELx_M = 1  # stage-1 MMU on
VECTOR_CURRENT_SP0, VECTOR_CURRENT_SPX, VECTOR_LOWER_A64 = 0x000, 0x200, 0x400
VECTOR_SYNC, VECTOR_IRQ = 0x000, 0x080
_emu_start = uclib.uc_emu_start
_emu_stop = uclib.uc_emu_stop

GPRS = [getattr(uc_arm64, f"UC_ARM64_REG_X{n}") for n in range(31)]
VREGS = [getattr(uc_arm64, f"UC_ARM64_REG_V{n}") for n in range(32)]
R = uc_arm64


def esr_ec(esr: int) -> int:
    """ESR_ELx_EC(): the exception class of a syndrome."""
    return (esr >> ESR_ELx_EC_SHIFT) & 0x3F


def decode_dabt_iss(insn: int, size: int) -> int | None:
    """The data-abort syndrome hardware gives for a load or store, or None where it gives none.

    A valid syndrome (ISV) exists only for single general-purpose register loads and stores
    without writeback (LDR/STR and their B, H, SB, SH, SW forms; LDUR/STUR; LDTR/STTR;
    LDAR/STLR), and says the size, the register, and how to extend a load. Everything else
    (LDP/STP, writeback, SIMD&FP, exclusives, atomics) has no syndrome: KVM cannot emulate it.
    """
    rt = insn & 0x1F
    log2 = insn >> 30
    if (insn >> 24) & 0x3F == 0x08 and (insn >> 23) & 1 and not (insn >> 21) & 1:
        is_load, sse, sf, ar = bool((insn >> 22) & 1), False, log2 == 3, True  # LDAR/STLR
    else:
        if (insn >> 27) & 0x7 != 0x7 or (insn >> 26) & 1:  # not a GPR load/store register
            return None
        kind = (insn >> 24) & 3
        if kind == 0:
            index = (insn >> 10) & 3
            if (insn >> 21) & 1:
                if index != 0b10:  # register offset; anything else here is an atomic
                    return None
            elif index in (0b01, 0b11):  # post- or pre-indexed: writeback
                return None
        elif kind != 1:  # unsigned offset is 1
            return None
        opc = (insn >> 22) & 3
        ar = False
        if opc in (0, 1):
            is_load, sse, sf = opc == 1, False, log2 == 3
        elif opc == 2 and log2 < 3:
            is_load, sse, sf = True, True, True  # LDRSB/LDRSH/LDRSW into Xt
        elif opc == 3 and log2 < 2:
            is_load, sse, sf = True, True, False  # LDRSB/LDRSH into Wt
        else:
            return None  # PRFM, or unallocated
    if 1 << log2 != size:
        return None
    iss = ESR_ELx_ISV | log2 << ESR_ELx_SAS_SHIFT | rt << ESR_ELx_SRT_SHIFT | ESR_ELx_FSC_TRANS_L3
    iss |= (ESR_ELx_SSE if sse else 0) | (ESR_ELx_SF if sf else 0) | (ESR_ELx_AR if ar else 0)
    return iss | (0 if is_load else ESR_ELx_WNR)


@dataclass(slots=True)
class Fault:
    """A guest access that stage 2 did not allow: where, how wide, and a store's value."""

    ipa: int = 0
    size: int = 0
    is_write: bool = False
    value: int = 0


class UcVcpu:
    """One vCPU's Unicorn AArch64 CPU: its stage-2 view of the slots, its hooks, one entry."""

    def __init__(self) -> None:
        self.uc = uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        uc.reg_write(R.UC_ARM64_REG_CP_REG, (*SCR_EL3, SCR_EL3_RW_HCE))
        self._h = engine_address(uc)
        emu_count_offset()
        self._lock = threading.Lock()
        self.wake = threading.Condition(self._lock)  # a blocked vCPU (WFI, stopped) waits here
        self.running = False
        self.kick_requested = False
        self.esr = 0  # the syndrome of the last trap (ESR_EL2)
        self.fault = Fault()  # FAR/HPFAR of the last abort, and a store's data
        self.unsupported = ""  # an exception kvmlab's CPU cannot deliver, by name
        self._exit: str | None = None
        self._snapshot: list[int] = []
        self.stage2 = UcStage2(uc)  # the guest-physical memory this CPU sees (stage 2)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_write_prot)
        uc.hook_add(UC_HOOK_EDGE_GENERATED, self._on_edge)

    def close(self) -> None:
        """Free the engine now (see close_engine) and the aliases of the slots' memory."""
        close_engine(self.uc)
        self.stage2.close()

    # --- registers: KVM's saved context (struct kvm_regs) to and from the CPU -----------------

    def load_ctxt(self, ctxt: kvm_regs) -> None:
        """__sysreg_restore_state: put the whole saved context into the CPU."""
        uc = self.uc
        r = ctxt.regs
        _batch(uc).reg_write_batch(list(zip(GPRS, r.regs, strict=True)))
        uc.reg_write(R.UC_ARM64_REG_PSTATE, r.pstate & 0xFFFFFFFF)
        uc.reg_write(R.UC_ARM64_REG_SP_EL0, r.sp)
        uc.reg_write(R.UC_ARM64_REG_SP_EL1, ctxt.sp_el1)
        uc.reg_write(R.UC_ARM64_REG_SP, ctxt.sp_el1 if _uses_sp_el1(r.pstate) else r.sp)
        uc.reg_write(R.UC_ARM64_REG_PC, r.pc)
        uc.reg_write(R.UC_ARM64_REG_ELR_EL1, ctxt.elr_el1)
        uc.reg_write(R.UC_ARM64_REG_CP_REG, (*SPSR_EL1, ctxt.spsr[0]))
        fp = ctxt.fp_regs
        for reg, (lo, hi) in zip(VREGS, fp.vregs, strict=True):
            uc.reg_write(reg, lo | hi << 64)
        uc.reg_write(R.UC_ARM64_REG_FPSR, fp.fpsr)
        uc.reg_write(R.UC_ARM64_REG_FPCR, fp.fpcr)

    def save_ctxt(self, ctxt: kvm_regs) -> None:
        """__sysreg_save_state: read the CPU's registers back into the saved context."""
        uc = self.uc
        r = ctxt.regs
        r.regs[:] = _batch(uc).reg_read_batch(GPRS)
        pstate = uc.reg_read(R.UC_ARM64_REG_PSTATE)
        sp = uc.reg_read(R.UC_ARM64_REG_SP)
        r.pstate = pstate
        if _uses_sp_el1(pstate):
            ctxt.sp_el1, r.sp = sp, uc.reg_read(R.UC_ARM64_REG_SP_EL0)
        else:
            r.sp, ctxt.sp_el1 = sp, uc.reg_read(R.UC_ARM64_REG_SP_EL1)
        r.pc = uc.reg_read(R.UC_ARM64_REG_PC)
        ctxt.elr_el1 = uc.reg_read(R.UC_ARM64_REG_ELR_EL1)
        ctxt.spsr[0] = uc.reg_read(R.UC_ARM64_REG_CP_REG, SPSR_EL1)
        fp = ctxt.fp_regs
        for reg, pair in zip(VREGS, fp.vregs, strict=True):
            value = uc.reg_read(reg)
            pair[0], pair[1] = value & (2**64 - 1), value >> 64
        fp.fpsr = uc.reg_read(R.UC_ARM64_REG_FPSR)
        fp.fpcr = uc.reg_read(R.UC_ARM64_REG_FPCR)

    def read_reg(self, reg: int) -> int:
        return int(self.uc.reg_read(reg))

    def write_reg(self, reg: int, value: int | tuple[int, ...]) -> None:
        self.uc.reg_write(reg, value)

    # --- memory: the stage-2 view (uc_stage2) ---------------------------------------------------

    @property
    def generation(self) -> int:
        """The memslots generation the CPU's memory was last built from."""
        return self.stage2.generation

    def load_memslots(self, slots: KvmMemslots) -> None:
        """Make the CPU's physical memory match the VM's slots (only what changed is remapped)."""
        self.stage2.load_memslots(slots)

    def invalidate_stale_code(self) -> None:
        """Drop translations of guest code the host rewrote (see UcStage2)."""
        self.stage2.invalidate_stale_code()

    def read_insn(self, address: int) -> int | None:
        """The instruction word at a guest address (the MMU is off: addresses are physical)."""
        hva = self.stage2.gpa_to_hva(address)
        if hva is None or address & 3:
            return None
        return int.from_bytes(ctypes.string_at(hva, 4), "little")

    def _on_edge(self, uc: Uc, cur: object, prev: object, _ud: object) -> None:
        """A new jump between translated blocks: their pages hold translated code."""
        for tb in (cur, prev):
            for address in (tb.pc, tb.pc + tb.size - 1):  # type: ignore[attr-defined]
                self.stage2.remember_code_page(address)

    # --- hooks: called by Unicorn in the middle of emu_start ------------------------------------

    def _stop(self, why: str) -> None:
        self._exit = why
        _emu_stop(self._h)

    def _on_interrupt(self, uc: Uc, intno: int, _ud: object) -> None:
        self._stop(
            {EXCP_HVC: "hvc", EXCP_SMC: "smc", EXCP_SWI: "svc", EXCP_BKPT: "brk"}.get(
                intno, "udf" if intno == EXCP_UDEF else f"exception {intno}"
            )
        )

    def _on_unmapped(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _ud: object
    ) -> bool:
        """A load or store where no slot is mapped: turn the page into an MMIO page and retry
        (code translated before its hook existed would not call it), or, where a slot's host
        memory is missing, report the abort (KVM fails it with EFAULT)."""
        what = self.stage2.unmapped_access(
            access, addr, size, self._on_mmio, _mmio_read, _mmio_write
        )
        if what == "efault":
            self._record(addr, size, access == UC_MEM_WRITE, value)
            self._stop("abort")
        elif what == "mmio":
            self._stop("retry")
        return False  # a fetch: an instruction abort

    def _on_mmio(self, uc: Uc, access: int, addr: int, size: int, value: int, _ud: object) -> None:
        """An access to a page with no slot: a data abort to the hypervisor."""
        if self._exit is None:
            self._record(addr, size, access == UC_MEM_WRITE, value)
            self._stop("abort")

    def _on_write_prot(
        self, uc: Uc, access: int, addr: int, size: int, value: int, _ud: object
    ) -> bool:
        """A store to a write-protected page: a READONLY slot's abort, or dirty logging."""
        self._record(addr, size, True, value)
        slot = self.stage2.slots.gfn_to_memslot(addr >> 12)
        self._exit = "dirty" if slot is not None and not slot.readonly else "abort"
        return False

    def _record(self, addr: int, size: int, is_write: bool, value: int) -> None:
        self.fault = Fault(addr, size, is_write, value & ((1 << (8 * size)) - 1))
        self._snapshot = _batch(self.uc).reg_read_batch(
            GPRS
        )  # before the load clobbers its register

    # --- entering the guest ---------------------------------------------------------------------

    def kick(self) -> None:
        """Force the vCPU out of the guest at an instruction boundary, or out of a wait.

        The run's instruction budget is cut to zero (as the x86 engine does), and a vCPU
        blocked in WFI or while powered off is woken.
        """
        with self._lock:
            self.kick_requested = True
            if self.running:
                ctypes.c_uint64.from_address(self._h + emu_count_offset()).value = 0
            self.wake.notify_all()

    @traced("__kvm_vcpu_run", args=lambda self: {"pc": self.read_reg(R.UC_ARM64_REG_PC)})
    def vcpu_run(self) -> int:
        """Run the guest until it traps to EL2; return ARM_EXCEPTION_TRAP (syndrome in `esr`)
        or ARM_EXCEPTION_IRQ (a kick)."""
        uc = self.uc
        while True:
            with self._lock:
                if self.kick_requested:
                    self.kick_requested = False
                    return ARM_EXCEPTION_IRQ
                self.running = True
            self._exit = None
            pc = uc.reg_read(R.UC_ARM64_REG_PC)
            try:
                err = _emu_start(self._h, ctypes.c_uint64(pc), 0, 0, ctypes.c_size_t(RUN_FOREVER))
            finally:
                with self._lock:
                    self.running = False
                    kicked, self.kick_requested = self.kick_requested, False
            if uc._hook_exception is not None:  # a hook raised: a kvmlab bug, not the guest's
                exc, uc._hook_exception = uc._hook_exception, None
                raise exc
            why = self._exit
            if why == "retry":
                self.stage2.flush_code()
                continue
            if why == "dirty":
                self.stage2.mark_page_dirty(self.fault.ipa)
                continue
            if err in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
                pc = uc.reg_read(R.UC_ARM64_REG_PC)
                self.fault = Fault(pc, 4, False, 0)
                return self._trap(ESR_ELx_EC_IABT_LOW, ESR_ELx_FSC_TRANS_L3)
            if why == "abort":
                return self._data_abort()
            if err != UC_ERR_OK:
                raise UcError(err)
            if why in ("hvc", "smc"):
                pc = uc.reg_read(R.UC_ARM64_REG_PC) - 4  # Unicorn stops after the instruction
                imm = ((self.read_insn(pc) or 0) >> 5) & 0xFFFF
                if why == "smc":  # an SMC trap leaves pc on it; KVM skips it (handle_smc)
                    uc.reg_write(R.UC_ARM64_REG_PC, pc)
                    return self._trap(ESR_ELx_EC_SMC64, imm)
                return self._trap(ESR_ELx_EC_HVC64, imm)
            if why is not None:
                if not self._guest_exception(why):
                    return ARM_EXCEPTION_TRAP
                continue
            if kicked:
                return ARM_EXCEPTION_IRQ
            pc = uc.reg_read(R.UC_ARM64_REG_PC) - 4
            if self.read_insn(pc) == INSN_WFI:  # WFI traps (HCR_EL2.TWI) with pc on it
                uc.reg_write(R.UC_ARM64_REG_PC, pc)
                return self._trap(ESR_ELx_EC_WFx, 0)
            return ARM_EXCEPTION_IRQ

    def _trap(self, ec: int, iss: int) -> int:
        self.esr = ec << ESR_ELx_EC_SHIFT | ESR_ELx_IL | iss
        return ARM_EXCEPTION_TRAP

    def _data_abort(self) -> int:
        """A data abort: pc is back on the instruction; undo what Unicorn did to its registers
        and give the syndrome hardware would (no ISV where it has none)."""
        uc = self.uc
        _batch(uc).reg_write_batch(list(zip(GPRS, self._snapshot, strict=True)))
        pc = uc.reg_read(R.UC_ARM64_REG_PC)
        insn = self.read_insn(pc)
        iss = None if insn is None else decode_dabt_iss(insn, self.fault.size)
        if uc.reg_read(R.UC_ARM64_REG_CP_REG, SCTLR_EL1) & SCTLR_ELx_M:
            self.unsupported = "a data abort with the guest's stage-1 MMU on"
            return self._trap(ESR_ELx_EC_UNKNOWN, 0)
        if iss is None:
            iss = ESR_ELx_FSC_TRANS_L3 | (ESR_ELx_WNR if self.fault.is_write else 0)
        return self._trap(ESR_ELx_EC_DABT_LOW, iss)

    def _guest_exception(self, why: str) -> bool:
        """An exception the guest takes at EL1 itself (no VM exit): enter its vector.

        Returns False for one kvmlab cannot deliver (`unsupported` says which).
        """
        pc = self.uc.reg_read(R.UC_ARM64_REG_PC)
        if why == "svc":  # pc is past the svc, which is where it returns
            imm = ((self.read_insn(pc - 4) or 0) >> 5) & 0xFFFF
            self.take_exception(VECTOR_SYNC, pc, ESR_ELx_EC_SVC64 << 26 | ESR_ELx_IL | imm)
        elif why == "brk":
            imm = ((self.read_insn(pc) or 0) >> 5) & 0xFFFF
            self.take_exception(VECTOR_SYNC, pc, ESR_ELx_EC_BRK64 << 26 | ESR_ELx_IL | imm)
        elif why == "udf":
            self.take_exception(VECTOR_SYNC, pc, ESR_ELx_EC_UNKNOWN << 26 | ESR_ELx_IL)
        else:
            self.unsupported = why
            self.esr = 0
            return False
        return True

    def take_exception(self, kind: int, return_address: int, esr: int | None = None) -> None:
        """Exception entry to EL1h: ELR_EL1, SPSR_EL1 (and ESR_EL1), DAIF masked, vector."""
        uc = self.uc
        pstate = uc.reg_read(R.UC_ARM64_REG_PSTATE)
        el = (pstate >> 2) & 3
        if el == 0:
            base = VECTOR_LOWER_A64
        else:
            base = VECTOR_CURRENT_SPX if pstate & 1 else VECTOR_CURRENT_SP0
        sp = uc.reg_read(R.UC_ARM64_REG_SP)
        uc.reg_write(R.UC_ARM64_REG_SP_EL1 if _uses_sp_el1(pstate) else R.UC_ARM64_REG_SP_EL0, sp)
        uc.reg_write(R.UC_ARM64_REG_ELR_EL1, return_address)
        uc.reg_write(R.UC_ARM64_REG_CP_REG, (*SPSR_EL1, pstate))
        if esr is not None:
            uc.reg_write(R.UC_ARM64_REG_ESR_EL1, esr)
        daif = PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT
        uc.reg_write(R.UC_ARM64_REG_PSTATE, daif | PSR_MODE_EL1h)
        uc.reg_write(R.UC_ARM64_REG_SP, uc.reg_read(R.UC_ARM64_REG_SP_EL1))
        uc.reg_write(R.UC_ARM64_REG_PC, uc.reg_read(R.UC_ARM64_REG_VBAR_EL1) + base + kind)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[threading.Condition]:
        """The wait queue a blocked vCPU sleeps on; a kick (or a signal) wakes it."""
        with self.wake:
            yield self.wake


def _batch(uc: Uc) -> Any:
    """The engine as the AArch64 binding it is (its batch register calls are not typed)."""
    return uc


def _uses_sp_el1(pstate: int) -> bool:
    """EL1h: the stack pointer in use is SP_EL1 (EL0t and EL1t use SP_EL0)."""
    return (pstate & PSR_MODE_MASK) == PSR_MODE_EL1h


def _mmio_read(uc: Uc, offset: int, size: int, _page: int) -> int:
    """An MMIO page's reads: the hook has already stopped the CPU; the value is never used."""
    return 0


def _mmio_write(uc: Uc, offset: int, size: int, value: int, _page: int) -> None:
    """An MMIO page's writes: the hook stopped the CPU; the store is reported, not done."""
