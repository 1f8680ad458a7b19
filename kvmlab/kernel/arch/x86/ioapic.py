"""The in-kernel IOAPIC (KVM_CREATE_IRQCHIP), after arch/x86/kvm/ioapic.c.

24 pins, each with a 64-bit redirection entry: vector, delivery mode, destination, edge or
level trigger, mask, and the remote IRR a level-triggered interrupt holds until its EOI.
Userspace reaches it through KVM_IRQ_LINE and KVM_GET/SET_IRQCHIP (the guest's IOREGSEL/IOWIN
page at 0xfec00000 is not emulated yet). A pin that fires is delivered to the local APICs it names
(`kvm_irq_delivery_to_apic`).
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/ioapic.c
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmlab.kernel.trace import note, traced
from kvmlab.uapi import KVM_IOAPIC_NUM_PINS, kvm_ioapic_state

IOAPIC_DEFAULT_BASE_ADDRESS = 0xFEC00000
# bit positions in a redirection entry (union kvm_ioapic_redirect_entry)
REMOTE_IRR = 1 << 14
TRIG_MODE = 1 << 15
MASK = 1 << 16


class KvmIoapic:
    """struct kvm_ioapic."""

    def __init__(self, deliver: Callable[[int], int]) -> None:
        self.lock = threading.RLock()
        self.deliver = deliver  # kvm_irq_delivery_to_apic for one redirection entry
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
