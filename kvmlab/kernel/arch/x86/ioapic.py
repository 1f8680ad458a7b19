"""The in-kernel IOAPIC (KVM_CREATE_IRQCHIP), after arch/x86/kvm/ioapic.c.

24 pins, each with a 64-bit redirection entry: vector, delivery mode, destination, edge or
level trigger, mask, and the remote IRR a level-triggered interrupt holds until its EOI.
Userspace reaches it through KVM_IRQ_LINE and KVM_GET/SET_IRQCHIP, the guest through the
IOREGSEL/IOWIN window at 0xfec00000. A pin that fires is delivered to the local APICs it names
(`kvm_irq_delivery_to_apic`); a level-triggered one waits for their EOI.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/ioapic.c
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmlab.kernel.trace import note, traced
from kvmlab.uapi import KVM_IOAPIC_NUM_PINS, kvm_ioapic_state

IOAPIC_DEFAULT_BASE_ADDRESS = 0xFEC00000
IOAPIC_MEM_LENGTH = 0x100
IOAPIC_REG_SELECT, IOAPIC_REG_WINDOW, IOAPIC_REG_EOI = 0x00, 0x10, 0x40
IOAPIC_REG_VERSION, IOAPIC_REG_APIC_ID, IOAPIC_REG_ARB_ID = 0x01, 0x00, 0x02
IOAPIC_VERSION_ID = 0x11
DELIVERY_STATUS = 1 << 12
# bit positions in a redirection entry (union kvm_ioapic_redirect_entry)
REMOTE_IRR = 1 << 14
TRIG_MODE = 1 << 15
MASK = 1 << 16


class KvmIoapic:
    """struct kvm_ioapic."""

    def __init__(
        self,
        deliver: Callable[[int], int],
        notify_acked: Callable[[int], None] = lambda pin: None,
        notify_masked: Callable[[int, bool], None] = lambda pin, masked: None,
    ) -> None:
        self.lock = threading.RLock()
        self.deliver = deliver  # kvm_irq_delivery_to_apic for one redirection entry
        self.notify_acked = notify_acked  # kvm_notify_acked_irq for a pin
        self.notify_masked = notify_masked  # kvm_fire_mask_notifiers for a pin
        self.redirtbl = [0] * KVM_IOAPIC_NUM_PINS
        self.base_address = IOAPIC_DEFAULT_BASE_ADDRESS
        self.ioregsel = self.id = self.irr = self.irr_delivered = 0
        kvm_ioapic_reset(self)


def kvm_ioapic_reset(ioapic: KvmIoapic) -> None:
    """Every pin masked, everything else zero, at the default base."""
    ioapic.redirtbl = [e | MASK for e in ioapic.redirtbl]
    ioapic.base_address = IOAPIC_DEFAULT_BASE_ADDRESS
    ioapic.ioregsel = ioapic.irr = ioapic.irr_delivered = ioapic.id = 0


@traced(args=lambda ioapic, irq, level: {"pin": irq, "level": level})
def kvm_ioapic_set_irq(ioapic: KvmIoapic, irq: int, level: int) -> int:
    with ioapic.lock:
        return ioapic_set_irq(ioapic, irq, level)


def ioapic_set_irq(ioapic: KvmIoapic, irq: int, level: int) -> int:
    """A pin's line changed: 0 if an edge or level request was coalesced, else delivery's
    result (-1 masked or waiting for an EOI, else how many APICs took it)."""
    mask = 1 << irq
    entry = ioapic.redirtbl[irq]
    edge = not entry & TRIG_MODE
    if not level:
        ioapic.irr &= ~mask
        return 1
    old_irr = ioapic.irr
    ioapic.irr |= mask
    if edge:
        ioapic.irr_delivered &= ~mask
        if old_irr == ioapic.irr:
            note("edge already pending: coalesced", pin=irq)
            return 0
    return ioapic_service(ioapic, irq)


@traced(args=lambda ioapic, irq: {"pin": irq})
def ioapic_service(ioapic: KvmIoapic, irq: int) -> int:
    """Send the pin's interrupt to the APICs, unless masked or a level one awaits its EOI."""
    entry = ioapic.redirtbl[irq]
    if entry & MASK or (entry & TRIG_MODE and entry & REMOTE_IRR):
        return -1
    if not entry & TRIG_MODE:
        ioapic.irr_delivered |= 1 << irq
    ret = ioapic.deliver(entry)
    if ret and entry & TRIG_MODE:
        ioapic.redirtbl[irq] = entry | REMOTE_IRR
    return ret


def kvm_get_ioapic(ioapic: KvmIoapic) -> kvm_ioapic_state:
    """KVM_GET_IRQCHIP for chip 2: irr without the edges already delivered."""
    with ioapic.lock:
        state = kvm_ioapic_state(
            base_address=ioapic.base_address,
            ioregsel=ioapic.ioregsel,
            id=ioapic.id,
            irr=ioapic.irr & ~ioapic.irr_delivered,
        )
        for i, entry in enumerate(ioapic.redirtbl):
            state.redirtbl[i].bits = entry
    return state


def kvm_set_ioapic(ioapic: KvmIoapic, state: kvm_ioapic_state) -> None:
    """KVM_SET_IRQCHIP for chip 2: take every field, then raise the pins irr names again."""
    with ioapic.lock:
        ioapic.base_address = state.base_address
        ioapic.ioregsel = state.ioregsel
        ioapic.id = state.id
        ioapic.redirtbl = [state.redirtbl[i].bits for i in range(KVM_IOAPIC_NUM_PINS)]
        ioapic.irr = ioapic.irr_delivered = 0
        for pin in range(KVM_IOAPIC_NUM_PINS):  # kvm_ioapic_inject_all
            if state.irr & (1 << pin):
                ioapic_set_irq(ioapic, pin, 1)


@traced(args=lambda ioapic, vector, level: {"vector": vector, "level": level})
def kvm_ioapic_update_eoi(ioapic: KvmIoapic, vector: int, level: bool) -> None:
    """A local APIC's EOI: the pins with that vector are acknowledged (their ack notifiers
    hear of it, outside the lock); for a level-triggered EOI remote IRR clears and a line
    still high is delivered again."""
    with ioapic.lock:
        pins = [pin for pin, entry in enumerate(ioapic.redirtbl) if entry & 0xFF == vector]
    for pin in pins:
        ioapic.notify_acked(pin)
    if not level:
        return
    with ioapic.lock:
        for pin in pins:
            entry = ioapic.redirtbl[pin]
            if entry & 0xFF != vector or not entry & TRIG_MODE:
                continue
            ioapic.redirtbl[pin] = entry & ~REMOTE_IRR
            if not entry & MASK and ioapic.irr & (1 << pin):
                ioapic_service(ioapic, pin)


def ioapic_read_indirect(ioapic: KvmIoapic) -> int:
    """IOWIN: the register IOREGSEL selects (version, ID, or half a redirection entry)."""
    sel = ioapic.ioregsel
    if sel == IOAPIC_REG_VERSION:
        return ((KVM_IOAPIC_NUM_PINS - 1) << 16) | IOAPIC_VERSION_ID
    if sel in (IOAPIC_REG_APIC_ID, IOAPIC_REG_ARB_ID):
        return (ioapic.id & 0xF) << 24
    index = (sel - 0x10) >> 1
    entry = ioapic.redirtbl[index] if 0 <= index < KVM_IOAPIC_NUM_PINS else 2**64 - 1
    return (entry >> 32) & 0xFFFF_FFFF if sel & 1 else entry & 0xFFFF_FFFF


@traced(args=lambda ioapic, val: {"ioregsel": hex(ioapic.ioregsel), "val": hex(val)})
def ioapic_write_indirect(ioapic: KvmIoapic, val: int) -> None:
    """IOWIN write: the ID, or half a redirection entry (remote IRR and delivery status are
    read-only; an edge entry drops remote IRR; an unmasked level pin still high fires)."""
    sel = ioapic.ioregsel
    if sel == IOAPIC_REG_APIC_ID:
        ioapic.id = (val >> 24) & 0xF
        return
    if sel in (IOAPIC_REG_VERSION, IOAPIC_REG_ARB_ID):
        return
    index = (sel - 0x10) >> 1
    if not 0 <= index < KVM_IOAPIC_NUM_PINS:
        return
    old = ioapic.redirtbl[index]
    high = sel & 1
    entry = (old & 0xFFFF_FFFF) | (val << 32) if high else (old & ~0xFFFF_FFFF) | val
    keep = REMOTE_IRR | DELIVERY_STATUS
    entry = (entry & ~keep) | (old & keep)
    if not entry & TRIG_MODE:
        entry &= ~REMOTE_IRR
    ioapic.redirtbl[index] = entry
    if (old ^ entry) & MASK:
        ioapic.notify_masked(index, bool(entry & MASK))
    level_pending = entry & TRIG_MODE and ioapic.irr & (1 << index)
    if level_pending and not entry & MASK and not entry & REMOTE_IRR:
        ioapic_service(ioapic, index)


def ioapic_in_range(ioapic: KvmIoapic, gpa: int) -> bool:
    return ioapic.base_address <= gpa < ioapic.base_address + IOAPIC_MEM_LENGTH


@traced(args=lambda ioapic, gpa, size: {"gpa": hex(gpa), "len": size})
def ioapic_mmio_read(ioapic: KvmIoapic, gpa: int, size: int) -> bytes:
    """IOREGSEL or IOWIN; anything else in the window reads 0."""
    with ioapic.lock:
        offset = gpa & 0xFF
        result = 0
        if offset == IOAPIC_REG_SELECT:
            result = ioapic.ioregsel
        elif offset == IOAPIC_REG_WINDOW:
            result = ioapic_read_indirect(ioapic)
    return result.to_bytes(8, "little")[:size]


@traced(args=lambda ioapic, gpa, data: {"gpa": hex(gpa), "len": len(data)})
def ioapic_mmio_write(ioapic: KvmIoapic, gpa: int, data: bytes) -> None:
    """IOREGSEL, IOWIN or the EOI register; only 4- and 8-byte stores count (low 32 bits)."""
    if len(data) not in (4, 8):
        note("IOAPIC: unsupported store size", len=len(data))
        return
    val = int.from_bytes(data[:4], "little")
    with ioapic.lock:
        offset = gpa & 0xFF
        if offset == IOAPIC_REG_SELECT:
            ioapic.ioregsel = val & 0xFF
        elif offset == IOAPIC_REG_WINDOW:
            ioapic_write_indirect(ioapic, val)
    if offset == IOAPIC_REG_EOI:
        kvm_ioapic_update_eoi(ioapic, val & 0xFF, True)
