"""The in-kernel local APIC of a vCPU (KVM_CREATE_IRQCHIP), after arch/x86/kvm/lapic.c.

The APIC's state is its register page, kept as KVM keeps it: 1 KiB with each 32-bit register
at its MMIO offset (so KVM_GET/SET_LAPIC copy the page). The guest reaches it through the xAPIC
page at the APIC base (0xfee00000) or, in x2APIC mode, MSRs 0x800-0x8ff. It takes interrupts
from the IOAPIC, from other APICs (the ICR: fixed, lowest priority, NMI, INIT, SIPI) and from
its own timer (one-shot, periodic, TSC-deadline), and offers the highest pending vector above
its processor priority to the vCPU at entry.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/lapic.c
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvmlab.kernel.arch.x86.ioapic import kvm_ioapic_update_eoi
from kvmlab.kernel.hrtimer import HrTimer
from kvmlab.kernel.trace import note, traced
from kvmlab.uapi import MSR_IA32_APICBASE_ENABLE

# register offsets in the page
APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_ARBPRI, APIC_PROCPRI, APIC_EOI = (
    0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0
)  # fmt: skip
APIC_LDR, APIC_DFR, APIC_SPIV = 0xD0, 0xE0, 0xF0
APIC_ISR, APIC_TMR, APIC_IRR, APIC_ESR = 0x100, 0x180, 0x200, 0x280
APIC_LVTCMCI, APIC_ICR, APIC_ICR2 = 0x2F0, 0x300, 0x310
APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370
)  # fmt: skip
APIC_TMICT, APIC_TMCCT, APIC_TDCR, APIC_SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0
LAPIC_MMIO_LENGTH = 1 << 12
APIC_BASE_MSR = 0x800
MSR_IA32_TSC_DEADLINE = 0x6E0
X2APIC_ENABLE = 1 << 10
X2APIC_BROADCAST = 0xFFFFFFFF

# what KVM reports: version 0x14, six LVT entries (no CMCI without MCG_CMCI_P)
APIC_VERSION = 0x14
NR_LVT_ENTRIES = 6
APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_LVT_MASKED = 1 << 16
APIC_VECTOR_MASK = 0xFF
APIC_SEND_PENDING = 1 << 12
APIC_MODE_MASK = 0x700
APIC_INPUT_POLARITY = 1 << 13
APIC_LVT_REMOTE_IRR = 1 << 14
APIC_LVT_LEVEL_TRIGGER = 1 << 15
APIC_ICR_BUSY = 1 << 12
APIC_DEST_LOGICAL = 1 << 11
APIC_INT_ASSERT = 1 << 14
APIC_INT_LEVELTRIG = 1 << 15
APIC_SHORT_MASK = 0xC0000
APIC_DEST_NOSHORT, APIC_DEST_SELF, APIC_DEST_ALLINC, APIC_DEST_ALLBUT = (
    0, 0x40000, 0x80000, 0xC0000
)  # fmt: skip
APIC_DFR_FLAT, APIC_DFR_CLUSTER = 0xFFFFFFFF, 0x0FFFFFFF
# delivery modes, as the ICR and LVTs encode them
APIC_DM_FIXED, APIC_DM_LOWEST, APIC_DM_SMI, APIC_DM_REMRD = 0x000, 0x100, 0x200, 0x300
APIC_DM_NMI, APIC_DM_INIT, APIC_DM_STARTUP, APIC_DM_EXTINT = 0x400, 0x500, 0x600, 0x700
APIC_BROADCAST = 0xFF
# timer modes (LVTT bits 17-18)
APIC_LVT_TIMER_ONESHOT, APIC_LVT_TIMER_PERIODIC, APIC_LVT_TIMER_TSCDEADLINE = (
    0, 1 << 17, 2 << 17
)  # fmt: skip
APIC_BUS_CYCLE_NS = 1  # KVM's APIC bus runs at 1 GHz
MIN_TIMER_PERIOD_NS = 200_000  # min_timer_period_us: periodic timers no faster than 5 kHz

LVT_MASK = APIC_LVT_MASKED | APIC_SEND_PENDING | APIC_VECTOR_MASK
LINT_MASK = (
    LVT_MASK | APIC_MODE_MASK | APIC_INPUT_POLARITY | APIC_LVT_REMOTE_IRR | APIC_LVT_LEVEL_TRIGGER
)
LVT_REGS = (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)
APIC_LVT_WRITE_MASK = {
    APIC_LVTT: LVT_MASK,  # plus the timer mode bits the guest's CPUID allows
    APIC_LVTTHMR: LVT_MASK | APIC_MODE_MASK,
    APIC_LVTPC: LVT_MASK | APIC_MODE_MASK,
    APIC_LVT0: LINT_MASK,
    APIC_LVT1: LINT_MASK,
    APIC_LVTERR: LVT_MASK,
}
# registers a read may name (kvm_lapic_readable_reg_mask); ARBPRI, DFR, ICR2 only in xAPIC mode
READABLE = frozenset(
    [APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_PROCPRI, APIC_LDR, APIC_SPIV, APIC_ESR, APIC_ICR]
    + [base + 0x10 * i for base in (APIC_ISR, APIC_TMR, APIC_IRR) for i in range(8)]
    + list(LVT_REGS)
    + [APIC_TMICT, APIC_TMCCT, APIC_TDCR]
)
XAPIC_ONLY = frozenset([APIC_ARBPRI, APIC_DFR, APIC_ICR2])
_U32 = struct.Struct("<I")


@dataclass
class KvmLapicIrq:
    """struct kvm_lapic_irq: one interrupt on its way to the APICs."""

    vector: int
    delivery_mode: int = APIC_DM_FIXED
    dest_mode_logical: bool = False
    level: bool = True
    trig_mode: bool = False  # level-triggered
    shorthand: int = APIC_DEST_NOSHORT
    dest_id: int = 0


class KvmLapic:
    """struct kvm_lapic: the register page, the timer, and the events waiting for the vCPU."""

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu
        self.regs = bytearray(0x400)
        self.lock = threading.RLock()
        self.timer = HrTimer(lambda: apic_timer_fn(self), f"kvm-lapic-timer/{vcpu.vcpu_id}")
        self.timer_period = 0  # ns; 0 for a one-shot
        self.target_expiration = 0  # ns, CLOCK_MONOTONIC
        self.tscdeadline = 0
        self.divide_count = 2
        self.pending_init = False  # KVM_APIC_INIT in pending_events
        self.pending_sipi = False  # KVM_APIC_SIPI
        self.sipi_vector = 0

    def get(self, reg: int) -> int:
        return int(_U32.unpack_from(self.regs, reg)[0])

    def set(self, reg: int, value: int) -> None:
        _U32.pack_into(self.regs, reg, value & 0xFFFF_FFFF)


def vcpu_apic(vcpu: Any) -> KvmLapic | None:
    return vcpu.arch.apic


def kvm_apic_hw_enabled(apic: KvmLapic) -> bool:
    return bool(apic.vcpu.arch.apic_base & MSR_IA32_APICBASE_ENABLE)


def kvm_apic_sw_enabled(apic: KvmLapic) -> bool:
    return bool(apic.get(APIC_SPIV) & APIC_SPIV_APIC_ENABLED)


def apic_enabled(apic: KvmLapic) -> bool:
    return kvm_apic_hw_enabled(apic) and kvm_apic_sw_enabled(apic)


def apic_x2apic_mode(apic: KvmLapic) -> bool:
    return bool(apic.vcpu.arch.apic_base & X2APIC_ENABLE)


def kvm_xapic_id(apic: KvmLapic) -> int:
    return apic.get(APIC_ID) >> 24


def kvm_apic_present(vcpu: Any) -> bool:
    """An in-kernel APIC that is hardware-enabled (APIC base MSR bit 11)."""
    apic = vcpu_apic(vcpu)
    return apic is not None and kvm_apic_hw_enabled(apic)


# --- creation and reset -----------------------------------------------------------------------


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_create_lapic(vcpu: Any) -> None:
    vcpu.arch.apic = KvmLapic(vcpu)


def kvm_free_lapic(vcpu: Any) -> None:
    apic = vcpu_apic(vcpu)
    if apic is not None:
        apic.timer.close()


@traced(args=lambda vcpu, init_event: {"vcpu": vcpu.vcpu_id, "init_event": init_event})
def kvm_lapic_reset(vcpu: Any, init_event: bool) -> None:
    """The APIC's reset state: every LVT masked (LVT0 ExtINT on the BSP), software-disabled
    (SPIV 0xff), flat logical mode, ID = the vCPU id, nothing pending."""
    apic = vcpu_apic(vcpu)
    if apic is None:
        return
    with apic.lock:
        apic.timer.cancel()
        apic.regs[:] = bytes(len(apic.regs))
        if not init_event:
            vcpu.arch.apic_base &= ~X2APIC_ENABLE
        kvm_apic_set_xapic_id(apic, vcpu.vcpu_id)
        apic.set(APIC_LVR, APIC_VERSION | ((NR_LVT_ENTRIES - 1) << 16))
        for reg in LVT_REGS:
            apic.set(reg, APIC_LVT_MASKED)
        if vcpu.vcpu_id == 0:  # KVM_X86_QUIRK_LINT0_REENABLED: the BSP takes the PIC
            apic.set(APIC_LVT0, APIC_DM_EXTINT)
        apic.set(APIC_DFR, APIC_DFR_FLAT)
        apic.set(APIC_SPIV, 0xFF)
        if apic_x2apic_mode(apic):
            apic.set(APIC_ID, vcpu.vcpu_id)
            apic.set(APIC_LDR, x2apic_ldr(vcpu.vcpu_id))
        apic.timer_period = apic.tscdeadline = 0
        apic.divide_count = 2


def kvm_apic_set_xapic_id(apic: KvmLapic, id_: int) -> None:
    apic.set(APIC_ID, id_ << 24)


def x2apic_ldr(id_: int) -> int:
    """The x2APIC's fixed logical id: cluster id in 31:16, one bit of 16 in 15:0."""
    return ((id_ >> 4) << 16) | (1 << (id_ & 0xF))


@traced(args=lambda vcpu, value: {"vcpu": vcpu.vcpu_id, "value": hex(value)})
def kvm_lapic_set_base(vcpu: Any, value: int) -> None:
    """A new APIC base MSR value: entering x2APIC mode moves the ID and LDR to x2APIC form."""
    apic = vcpu_apic(vcpu)
    old = vcpu.arch.apic_base
    vcpu.arch.apic_base = value
    if apic is None:
        return
    with apic.lock:
        if (old ^ value) & MSR_IA32_APICBASE_ENABLE and not value & MSR_IA32_APICBASE_ENABLE:
            apic.timer.cancel()
        if value & X2APIC_ENABLE and not old & X2APIC_ENABLE:
            apic.set(APIC_ID, vcpu.vcpu_id)
            apic.set(APIC_LDR, x2apic_ldr(vcpu.vcpu_id))
        elif not value & MSR_IA32_APICBASE_ENABLE:
            kvm_apic_set_xapic_id(apic, vcpu.vcpu_id)


def apic_base_page(vcpu: Any) -> int | None:
    """The guest-physical page the xAPIC decodes, if it decodes one."""
    apic = vcpu_apic(vcpu)
    if apic is None or not kvm_apic_hw_enabled(apic):
        return None
    return int(vcpu.arch.apic_base) & ~0xFFF & ((1 << 52) - 1)


# --- priorities and the IRR/ISR ---------------------------------------------------------------


def _highest_vector(apic: KvmLapic, base: int) -> int:
    for i in range(7, -1, -1):
        word = apic.get(base + 0x10 * i)
        if word:
            return 32 * i + word.bit_length() - 1
    return -1


def _vector_bit(apic: KvmLapic, base: int, vector: int) -> bool:
    return bool(apic.get(base + 0x10 * (vector >> 5)) >> (vector & 31) & 1)


def _set_vector_bit(apic: KvmLapic, base: int, vector: int, on: bool) -> None:
    reg = base + 0x10 * (vector >> 5)
    word = apic.get(reg)
    bit = 1 << (vector & 31)
    apic.set(reg, word | bit if on else word & ~bit)


def apic_update_ppr(apic: KvmLapic) -> int:
    """PPR = TPR, or the class of the highest in-service vector if that is higher."""
    tpr = apic.get(APIC_TASKPRI)
    isrv = max(_highest_vector(apic, APIC_ISR), 0)
    ppr = tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0
    apic.set(APIC_PROCPRI, ppr)
    return ppr


def kvm_apic_has_interrupt(vcpu: Any) -> int:
    """The highest requested vector whose class is above the processor priority, or -1."""
    apic = vcpu_apic(vcpu)
    if apic is None or not kvm_apic_hw_enabled(apic):
        return -1
    with apic.lock:
        ppr = apic_update_ppr(apic)
        irr = _highest_vector(apic, APIC_IRR)
        if irr == -1 or (irr & 0xF0) <= ppr:
            return -1
        return irr


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_get_apic_interrupt(vcpu: Any) -> int:
    """The interrupt acknowledge: the vector moves from IRR to ISR (it is in service)."""
    apic = vcpu_apic(vcpu)
    assert apic is not None
    with apic.lock:
        vector = kvm_apic_has_interrupt(vcpu)
        if vector == -1:
            return -1
        _set_vector_bit(apic, APIC_IRR, vector, False)
        _set_vector_bit(apic, APIC_ISR, vector, True)
        apic_update_ppr(apic)
        return vector


@traced(args=lambda apic: {"vcpu": apic.vcpu.vcpu_id})
def apic_set_eoi(apic: KvmLapic) -> None:
    """EOI: the highest in-service vector is done, and the IOAPIC is told."""
    with apic.lock:
        vector = _highest_vector(apic, APIC_ISR)
        if vector == -1:
            return
        _set_vector_bit(apic, APIC_ISR, vector, False)
        apic_update_ppr(apic)
        level = _vector_bit(apic, APIC_TMR, vector)
    kvm_ioapic_send_eoi(apic, vector, level)


def kvm_ioapic_send_eoi(apic: KvmLapic, vector: int, level: bool) -> None:
    """The IOAPIC hears of every EOI (its ack notifiers want the edge ones too); TMR says
    whether it was level-triggered."""
    chip = apic.vcpu.kvm.arch.irqchip
    if chip is not None:
        kvm_ioapic_update_eoi(chip.vioapic, vector, level)


def kvm_vcpu_kick(vcpu: Any) -> None:
    """Wake the vCPU if it is blocked in KVM_RUN (HLT), or make it leave the guest."""
    arch = vcpu.arch
    arch.hw.kick()
    with arch.halt_wait:
        arch.halt_wait.notify_all()


# --- accepting interrupts -----------------------------------------------------------------------


@traced(
    "__apic_accept_irq",
    args=lambda apic, irq: {
        "vcpu": apic.vcpu.vcpu_id,
        "mode": irq.delivery_mode >> 8,
        "vector": irq.vector,
    },
)
def kvm_apic_accept_interrupt(apic: KvmLapic, irq: KvmLapicIrq) -> int:
    """__apic_accept_irq: 1 if the APIC took the interrupt, 0 if not (a fixed interrupt to a
    software-disabled APIC, an INIT de-assert)."""
    vcpu = apic.vcpu
    mode = irq.delivery_mode
    if mode in (APIC_DM_FIXED, APIC_DM_LOWEST):
        if irq.trig_mode and not irq.level:
            return 0
        if not apic_enabled(apic):
            note("APIC software-disabled: not accepted", vector=irq.vector)
            return 0
        with apic.lock:
            _set_vector_bit(apic, APIC_TMR, irq.vector, irq.trig_mode)
            _set_vector_bit(apic, APIC_IRR, irq.vector, True)
    elif mode == APIC_DM_NMI:
        arch = vcpu.arch
        arch.nmi_pending = min(arch.nmi_pending + 1, 1 if arch.nmi_masked else 2)
    elif mode == APIC_DM_INIT:
        if irq.trig_mode and not irq.level:
            return 0  # the INIT level de-assert does nothing
        with apic.lock:  # an INIT drops a SIPI not yet taken
            apic.pending_init, apic.pending_sipi = True, False
    elif mode == APIC_DM_STARTUP:
        with apic.lock:
            apic.sipi_vector = irq.vector
            apic.pending_sipi = True
    elif mode == APIC_DM_EXTINT:
        return 0  # kvm_apic_accept_pic_intr handles the PIC's interrupts
    kvm_vcpu_kick(vcpu)
    return 1


def kvm_apic_match_dest(target: KvmLapic, source: KvmLapic | None, irq: KvmLapicIrq) -> bool:
    """Does `target` take an interrupt with this shorthand/destination from `source`?"""
    if irq.shorthand == APIC_DEST_SELF:
        return target is source
    if irq.shorthand == APIC_DEST_ALLINC:
        return True
    if irq.shorthand == APIC_DEST_ALLBUT:
        return target is not source
    mda = irq.dest_id
    if apic_x2apic_mode(target):
        if source is None and mda == APIC_BROADCAST:
            mda = X2APIC_BROADCAST  # the IOAPIC's xAPIC broadcast still reaches x2APICs
        if mda == X2APIC_BROADCAST:
            return True
        if not irq.dest_mode_logical:
            return target.get(APIC_ID) == mda
        ldr = target.get(APIC_LDR)
        return ldr >> 16 == mda >> 16 and bool(ldr & mda & 0xFFFF)
    mda &= 0xFF
    if mda == APIC_BROADCAST:
        return True
    if not irq.dest_mode_logical:
        return kvm_xapic_id(target) == mda
    logical_id = target.get(APIC_LDR) >> 24
    if target.get(APIC_DFR) == APIC_DFR_FLAT:
        return bool(logical_id & mda)
    return logical_id >> 4 == mda >> 4 and bool(logical_id & mda & 0xF)


@traced(
    args=lambda kvm, source, irq: {
        "vector": irq.vector,
        "mode": irq.delivery_mode >> 8,
        "dest": irq.dest_id,
        "shorthand": irq.shorthand >> 18,
    }
)
def kvm_irq_delivery_to_apic(kvm: Any, source: KvmLapic | None, irq: KvmLapicIrq) -> int:
    """Send an interrupt to every APIC it names: -1 if none, else how many accepted it.

    A lowest-priority interrupt goes to one of the software-enabled targets, chosen by
    vector hashing as KVM does by default.
    """
    lowest = irq.delivery_mode == APIC_DM_LOWEST
    if not irq.dest_mode_logical and irq.dest_id == APIC_BROADCAST and lowest:
        irq.delivery_mode, lowest = APIC_DM_FIXED, False
    if irq.shorthand == APIC_DEST_SELF and source is not None:
        return kvm_apic_accept_interrupt(source, irq)
    targets = [
        apic
        for vcpu in list(kvm.vcpu_array)
        if (apic := vcpu_apic(vcpu)) is not None
        and kvm_apic_hw_enabled(apic)
        and kvm_apic_match_dest(apic, source, irq)
    ]
    # the APIC map's fast path (there is a map once a vCPU exists) finds a physical
    # destination and counts from 0; the slow path counts from -1
    physical = irq.shorthand == APIC_DEST_NOSHORT and not irq.dest_mode_logical
    fast = physical and irq.dest_id != APIC_BROADCAST and bool(kvm.vcpu_array)
    ret = 0 if fast else -1
    if lowest:
        enabled = [apic for apic in targets if kvm_apic_sw_enabled(apic)]
        targets = [enabled[irq.vector % len(enabled)]] if enabled else []
    for apic in targets:
        ret = max(ret, 0) + kvm_apic_accept_interrupt(apic, irq)
    return ret


@traced(args=lambda apic, icr_low, icr_high: {"icr": hex(icr_high << 32 | icr_low)})
def kvm_apic_send_ipi(apic: KvmLapic, icr_low: int, icr_high: int) -> None:
    """A write to the ICR sends an inter-processor interrupt."""
    irq = KvmLapicIrq(
        vector=icr_low & APIC_VECTOR_MASK,
        delivery_mode=icr_low & APIC_MODE_MASK,
        dest_mode_logical=bool(icr_low & APIC_DEST_LOGICAL),
        level=bool(icr_low & APIC_INT_ASSERT),
        trig_mode=bool(icr_low & APIC_INT_LEVELTRIG),
        shorthand=icr_low & APIC_SHORT_MASK,
        dest_id=icr_high if apic_x2apic_mode(apic) else icr_high >> 24,
    )
    kvm_irq_delivery_to_apic(apic.vcpu.kvm, apic, irq)


def kvm_apic_local_deliver(apic: KvmLapic, lvt_reg: int) -> int:
    """An interrupt from one of the APIC's own LVT sources (the timer, LINT0/1)."""
    lvt = apic.get(lvt_reg)
    if not kvm_apic_hw_enabled(apic) or lvt & APIC_LVT_MASKED:
        return 0
    irq = KvmLapicIrq(
        vector=lvt & APIC_VECTOR_MASK,
        delivery_mode=lvt & APIC_MODE_MASK,
        trig_mode=bool(lvt & APIC_LVT_LEVEL_TRIGGER),
    )
    return kvm_apic_accept_interrupt(apic, irq)


def kvm_apic_has_pending_init_or_sipi(vcpu: Any) -> bool:
    apic = vcpu_apic(vcpu)
    return apic is not None and (apic.pending_init or apic.pending_sipi)


# --- register reads and writes ------------------------------------------------------------------


@traced(args=lambda apic, offset: {"vcpu": apic.vcpu.vcpu_id, "reg": hex(offset)})
def kvm_lapic_reg_read(apic: KvmLapic, offset: int) -> int | None:
    """A 32-bit register, or None if it cannot be read (in this mode)."""
    readable = offset in READABLE or (offset in XAPIC_ONLY and not apic_x2apic_mode(apic))
    if not readable:
        return None
    with apic.lock:
        if offset == APIC_ARBPRI:
            return 0
        if offset == APIC_TMCCT:
            return apic_get_tmcct(apic)
        if offset == APIC_PROCPRI:
            return apic_update_ppr(apic)
        return apic.get(offset)


@traced(args=lambda apic, reg, val: {"vcpu": apic.vcpu.vcpu_id, "reg": hex(reg), "val": hex(val)})
def kvm_lapic_reg_write(apic: KvmLapic, reg: int, val: int) -> bool:
    """Write a register as the guest does; False if it is not writable (x2APIC: #GP)."""
    x2apic = apic_x2apic_mode(apic)
    with apic.lock:
        if reg == APIC_ID:
            if x2apic:
                return False
            kvm_apic_set_xapic_id(apic, val >> 24)
        elif reg == APIC_TASKPRI:
            apic.set(APIC_TASKPRI, val & 0xFF)
            apic_update_ppr(apic)
        elif reg == APIC_EOI:
            pass  # below, outside the lock: the IOAPIC's lock comes before the APICs'
        elif reg == APIC_LDR:
            if x2apic:
                return False
            apic.set(APIC_LDR, val & 0xFF000000)
        elif reg == APIC_DFR:
            if x2apic:
                return False
            apic.set(APIC_DFR, val | 0x0FFFFFFF)
        elif reg == APIC_SPIV:
            apic.set(APIC_SPIV, val & 0x3FF)
            if not val & APIC_SPIV_APIC_ENABLED:  # software-disabling masks every LVT
                for lvt in LVT_REGS:
                    apic.set(lvt, apic.get(lvt) | APIC_LVT_MASKED)
        elif reg == APIC_ICR:
            val &= ~APIC_ICR_BUSY
            apic.set(APIC_ICR, val)
        elif reg == APIC_ICR2:
            if x2apic:
                return False
            apic.set(APIC_ICR2, val & 0xFF000000)
        elif reg in LVT_REGS:
            if not kvm_apic_sw_enabled(apic):
                val |= APIC_LVT_MASKED
            mask = APIC_LVT_WRITE_MASK[reg]
            old_mode = apic_lvtt_mode(apic)
            if reg == APIC_LVTT:
                mask |= timer_mode_mask(apic)
            apic.set(reg, val & mask)
            if reg == APIC_LVTT and old_mode != apic_lvtt_mode(apic):
                apic_update_lvtt(apic)
        elif reg == APIC_TMICT:
            if apic_lvtt_mode(apic) != APIC_LVT_TIMER_TSCDEADLINE:
                apic.timer.cancel()
                apic.set(APIC_TMICT, val)
                start_apic_timer(apic)
        elif reg == APIC_TDCR:
            apic.set(APIC_TDCR, val & 0xB)
            update_divide_count(apic)
        elif reg == APIC_ESR:
            if x2apic and val:
                return False
            apic.set(APIC_ESR, 0)
        elif reg == APIC_SELF_IPI and x2apic:
            kvm_apic_send_ipi(apic, APIC_DEST_SELF | (val & APIC_VECTOR_MASK), 0)
        else:
            return False
    if reg == APIC_EOI:
        apic_set_eoi(apic)
    elif reg == APIC_ICR:  # outside the lock: delivery takes other APICs' locks
        kvm_apic_send_ipi(apic, val, apic.get(APIC_ICR2))
    return True


def apic_mmio_read(vcpu: Any, gpa: int, size: int) -> bytes | None:
    """A guest load from the xAPIC page: 1-4 bytes within one register; None for a register
    that cannot be read (KVM then leaves the emulator's read buffer as it was). In x2APIC
    mode the page reads as all ones."""
    apic = vcpu_apic(vcpu)
    assert apic is not None
    if apic_x2apic_mode(apic):
        return b"\xff" * size  # KVM_X86_QUIRK_LAPIC_MMIO_HOLE
    offset = gpa & 0xFFF
    alignment = offset & 0xF
    if alignment + size > 4 or offset >= 0x400:
        return None
    value = kvm_lapic_reg_read(apic, offset & ~0xF)
    if value is None:
        return None
    return value.to_bytes(4, "little")[alignment : alignment + size]


def apic_mmio_write(vcpu: Any, gpa: int, data: bytes) -> None:
    """A guest store to the xAPIC page: only aligned 32-bit stores are registers."""
    apic = vcpu_apic(vcpu)
    assert apic is not None
    offset = gpa & 0xFFF
    if apic_x2apic_mode(apic) or len(data) != 4 or offset & 0xF or offset >= 0x400:
        return
    kvm_lapic_reg_write(apic, offset & 0xFF0, int.from_bytes(data, "little"))


def kvm_x2apic_msr_read(vcpu: Any, msr: int) -> int | None:
    """RDMSR of 0x800-0x8ff: the register at (msr - 0x800) << 4; None (#GP) unless in x2APIC
    mode and readable. The ICR reads as one 64-bit value."""
    apic = vcpu_apic(vcpu)
    if apic is None or not apic_x2apic_mode(apic):
        return None
    reg = (msr - APIC_BASE_MSR) << 4
    if reg in (APIC_DFR, APIC_ICR2):
        return None
    low = kvm_lapic_reg_read(apic, reg)
    if low is None:
        return None
    if reg == APIC_ICR:
        return low | apic.get(APIC_ICR2) << 32
    return low


def kvm_x2apic_msr_write(vcpu: Any, msr: int, value: int) -> bool:
    """WRMSR of 0x800-0x8ff; False (#GP) unless in x2APIC mode and writable. A write to the
    ICR sends the IPI with the destination in the high half."""
    apic = vcpu_apic(vcpu)
    if apic is None or not apic_x2apic_mode(apic):
        return False
    reg = (msr - APIC_BASE_MSR) << 4
    if reg == APIC_ICR:
        with apic.lock:
            apic.set(APIC_ICR2, value >> 32)
        return kvm_lapic_reg_write(apic, APIC_ICR, value & 0xFFFF_FFFF)
    if value >> 32 or reg == APIC_ICR2:
        return False
    return kvm_lapic_reg_write(apic, reg, value)


# --- the timer ----------------------------------------------------------------------------------


def timer_mode_mask(apic: KvmLapic) -> int:
    """The LVTT mode bits the guest may set: none until KVM_SET_CPUID2 gives leaf 1 (KVM sets
    the mask there), then periodic, and TSC-deadline if that CPUID offers it."""
    found = apic.vcpu.arch.cpuid.find(1, 0)
    if found is None:
        return 0
    return (3 << 17) if found[2] & (1 << 24) else (1 << 17)


def apic_lvtt_mode(apic: KvmLapic) -> int:
    return apic.get(APIC_LVTT) & (3 << 17)


def update_divide_count(apic: KvmLapic) -> None:
    tdcr = apic.get(APIC_TDCR)
    shift = ((tdcr & 0x3) | ((tdcr & 0x8) >> 1)) + 1
    apic.divide_count = 1 << (shift & 7)


def apic_update_lvtt(apic: KvmLapic) -> None:
    """A new timer mode stops the timer and clears its count."""
    apic.timer.cancel()
    apic.set(APIC_TMICT, 0)
    apic.timer_period = apic.tscdeadline = 0


@traced(args=lambda apic: {"vcpu": apic.vcpu.vcpu_id})
def start_apic_timer(apic: KvmLapic, count_reg: int = APIC_TMICT) -> None:
    """Arm the hrtimer for count x divide x 1 ns (periodic: at most 5 kHz, as KVM limits it).
    The count is TMICT's, or TMCCT's when KVM_SET_LAPIC restores a running timer."""
    period = apic.get(APIC_TMICT) * APIC_BUS_CYCLE_NS * apic.divide_count
    mode = apic_lvtt_mode(apic)
    if period == 0 or mode == APIC_LVT_TIMER_TSCDEADLINE:
        apic.timer_period = 0
        return
    if mode == APIC_LVT_TIMER_PERIODIC:
        period = max(period, MIN_TIMER_PERIOD_NS)
    first = apic.get(count_reg) * APIC_BUS_CYCLE_NS * apic.divide_count
    if first <= 0:
        first = period if mode == APIC_LVT_TIMER_PERIODIC else 0
    apic.timer_period = period if mode == APIC_LVT_TIMER_PERIODIC else 0
    apic.target_expiration = time.monotonic_ns() + first
    apic.timer.start(apic.target_expiration)


def apic_get_tmcct(apic: KvmLapic) -> int:
    """The current count: what is left of the period, in bus cycles / divide."""
    if apic_lvtt_mode(apic) == APIC_LVT_TIMER_TSCDEADLINE or not apic.get(APIC_TMICT):
        return 0
    if not apic.timer.active():
        return 0
    remaining = max(apic.target_expiration - time.monotonic_ns(), 0)
    if apic.timer_period:
        remaining %= apic.timer_period
    return remaining // (APIC_BUS_CYCLE_NS * apic.divide_count)


@traced(args=lambda apic: {"vcpu": apic.vcpu.vcpu_id})
def apic_timer_fn(apic: KvmLapic) -> int | None:
    """The hrtimer fired: deliver LVTT's vector; a periodic timer re-arms a period later."""
    with apic.lock:
        mode = apic_lvtt_mode(apic)
        if mode == APIC_LVT_TIMER_TSCDEADLINE:
            apic.tscdeadline = 0
    kvm_apic_local_deliver(apic, APIC_LVTT)
    if mode == APIC_LVT_TIMER_PERIODIC and apic.timer_period:
        apic.target_expiration += apic.timer_period
        return max(apic.target_expiration, time.monotonic_ns())
    return None


def kvm_get_lapic_tscdeadline_msr(vcpu: Any) -> int:
    apic = vcpu_apic(vcpu)
    if apic is None or apic_lvtt_mode(apic) != APIC_LVT_TIMER_TSCDEADLINE:
        return 0
    return apic.tscdeadline


@traced(args=lambda vcpu, data, guest_tsc: {"vcpu": vcpu.vcpu_id, "deadline": data})
def kvm_set_lapic_tscdeadline_msr(vcpu: Any, data: int, guest_tsc: int) -> None:
    """TSC-deadline mode: fire when the guest's TSC (now `guest_tsc`) reaches `data`; 0
    disarms."""
    apic = vcpu_apic(vcpu)
    if apic is None or apic_lvtt_mode(apic) != APIC_LVT_TIMER_TSCDEADLINE:
        return
    with apic.lock:
        apic.timer.cancel()
        apic.tscdeadline = data
        if not data:
            return
        khz = vcpu.arch.tsc_khz or vcpu.kvm.arch.default_tsc_khz
        delta_ns = max(data - guest_tsc, 0) * 1_000_000 // max(khz, 1)
        apic.target_expiration = time.monotonic_ns() + delta_ns
        apic.timer.start(apic.target_expiration)


# --- KVM_GET_LAPIC / KVM_SET_LAPIC ------------------------------------------------------------


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_apic_get_state(vcpu: Any) -> bytes:
    """The register page, with TMCCT filled in with the current count."""
    apic = vcpu_apic(vcpu)
    assert apic is not None
    with apic.lock:
        page = bytearray(apic.regs)
        _U32.pack_into(page, APIC_TMCCT, apic_get_tmcct(apic))
        if apic_x2apic_mode(apic):  # without KVM_CAP_X2APIC_API the ID is in xAPIC form
            _U32.pack_into(page, APIC_ID, apic.get(APIC_ID) << 24)
    return bytes(page)


@traced(args=lambda vcpu, page: {"vcpu": vcpu.vcpu_id})
def kvm_apic_set_state(vcpu: Any, page: bytes) -> None:
    """Load a register page: priorities recomputed, the timer restarted from TMICT."""
    apic = vcpu_apic(vcpu)
    assert apic is not None
    with apic.lock:
        apic.timer.cancel()
        apic.regs[:] = page
        if apic_x2apic_mode(apic):  # the x2APIC ID cannot be changed; the LDR follows it
            apic.set(APIC_ID, vcpu.vcpu_id)
            apic.set(APIC_LDR, x2apic_ldr(vcpu.vcpu_id))
        update_divide_count(apic)
        apic_update_ppr(apic)
        apic.tscdeadline = 0
        start_apic_timer(apic, APIC_TMCCT)
        apic.set(APIC_TMCCT, 0)
    kvm_vcpu_kick(vcpu)
