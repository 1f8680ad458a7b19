"""The in-kernel 8259 pair (KVM_CREATE_IRQCHIP), after arch/x86/kvm/i8259.c.

The chip's core is `kvmlab.hw.i8259`, shared with the VMM's QEMU model; what is KVM's own is
here: ICW1 keeps ISR and, with ICW4, the auto-EOI and nested modes; a poll with nothing pending
reads 7; the slave reaches the master's line 2 as a pulse; the INT output (`output`) is what
`kvm_cpu_has_extint` looks at, and a rising output kicks the vCPU that takes PIC interrupts.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/i8259.c
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kvmlab.hw.i8259 import ICW1_IC4, PIC_CASCADE_IRQ, PIC_STATE_FIELDS, PicChipCore
from kvmlab.kernel.trace import traced
from kvmlab.uapi import kvm_pic_state

PIC_NUM_PINS = 16
PIC_PORTS = {0x20: (0, 0), 0x21: (0, 1), 0xA0: (1, 0), 0xA1: (1, 1)}  # port -> (chip, offset)
ELCR_PORTS = {0x4D0: 0, 0x4D1: 1}


class KvmKpicState(PicChipCore):
    """struct kvm_kpic_state: one chip of the pair."""

    def __init__(self, pics_state: KvmPic, master: bool) -> None:
        super().__init__(master)
        self.pics_state = pics_state

    def update_irq(self) -> None:
        pic_update_irq(self.pics_state)

    def icw1(self, value: int) -> None:
        """ICW1 (single mode and level-triggered mode are not implemented, as in KVM)."""
        self.init4 = bool(value & ICW1_IC4)
        kvm_pic_reset(self)

    def clear_isr(self, line: int) -> None:
        """pic_clear_isr: the ack notifiers hear of it once the lock is released."""
        super().clear_isr(line)
        self.pics_state.acked.append(line + (0 if self.master else 8))

    def ocw1(self, value: int) -> None:
        """OCW1: each line whose mask changed is reported to the mask notifiers."""
        changed = self.imr ^ value
        base = 0 if self.master else 8
        for line in range(8):
            if changed & (1 << line):
                self.pics_state.masked.append((line + base, bool(value & (1 << line))))
        super().ocw1(value)

    def poll_read(self) -> int:
        """pic_poll_read: acknowledge and end the best request at once; 7 when none."""
        line = self.get_irq()
        s = self.pics_state
        if line < 0:
            pic_update_irq(s)
            return 0x07
        if not self.master:  # the slave's request also reached the master's line 2
            master = s.pics[0]
            master.isr &= ~(1 << PIC_CASCADE_IRQ)
            master.irr &= ~(1 << PIC_CASCADE_IRQ)
        self.irr &= ~(1 << line)
        self.clear_isr(line)
        if not self.master or line != PIC_CASCADE_IRQ:
            pic_update_irq(s)
        return line | 0x80


class KvmPic:
    """struct kvm_pic: the two chips, their INT output and the lock they share."""

    def __init__(
        self,
        acceptor: Callable[[], Any],
        kick: Callable[[Any], None],
        notify_acked: Callable[[int], None] = lambda pin: None,
        notify_masked: Callable[[int, bool], None] = lambda pin, masked: None,
    ) -> None:
        self.lock = threading.RLock()
        self.pics = (KvmKpicState(self, True), KvmKpicState(self, False))
        self.output = False
        self.wakeup_needed = False
        self.acceptor = acceptor  # the first vCPU whose LAPIC accepts PIC interrupts, or None
        self.kick = kick  # kvm_vcpu_kick
        # pins (0-15) acknowledged and mask changes, told to the notifiers after unlocking
        self.acked: list[int] = []
        self.masked: list[tuple[int, bool]] = []
        self.notify_acked = notify_acked  # kvm_notify_acked_irq for this chip pair
        self.notify_masked = notify_masked  # kvm_fire_mask_notifiers

    def unlock_and_wake(self) -> None:
        """pic_unlock: after the lock is released, tell the ack and mask notifiers what
        happened under it, and kick the vCPU if the output rose."""
        with self.lock:
            acked, self.acked = self.acked, []
            masked, self.masked = self.masked, []
        for pin, mask in masked:
            self.notify_masked(pin, mask)
        for pin in acked:
            self.notify_acked(pin)
        wake, self.wakeup_needed = self.wakeup_needed, False
        if wake:
            vcpu = self.acceptor()
            if vcpu is not None:
                self.kick(vcpu)


def pic_update_irq(s: KvmPic) -> None:
    """The slave's request pulses the master's line 2; the master drives the output."""
    if s.pics[1].get_irq() >= 0:
        s.pics[0].set_irq1(PIC_CASCADE_IRQ, True)
        s.pics[0].set_irq1(PIC_CASCADE_IRQ, False)
    pic_irq_request(s, s.pics[0].get_irq() >= 0)


def pic_irq_request(s: KvmPic, level: bool) -> None:
    if not s.output and level:
        s.wakeup_needed = True
    s.output = level


def kvm_pic_reset(s: KvmKpicState) -> None:
    """ICW1: edge requests and the mask go; ISR and the vector base stay (but a line whose
    edge request was pending leaves ISR, if some vCPU takes PIC interrupts)."""
    edge_irr = s.irr & ~s.elcr
    s.last_irr = 0
    s.irr &= s.elcr
    s.imr = s.priority_add = 0
    s.special_mask = s.read_reg_select = False
    if not s.init4:
        s.special_fully_nested_mode = s.auto_eoi = False
    s.init_state = 1
    if s.pics_state.acceptor() is None:
        return
    for line in range(8):
        if edge_irr & (1 << line):
            s.clear_isr(line)


@traced(args=lambda s, irq, level: {"irq": irq, "level": level})
def kvm_pic_set_irq(s: KvmPic, irq: int, level: int) -> int:
    """A pin (0-15) of the pair changed: -1 if masked, 0 if coalesced, else 1."""
    with s.lock:
        chip = s.pics[irq >> 3]
        ret = chip.set_irq1(irq & 7, bool(level))
        pic_update_irq(s)
        ret = -1 if chip.imr & (1 << (irq & 7)) else ret
    s.unlock_and_wake()
    return ret


@traced()
def kvm_pic_read_irq(s: KvmPic) -> int:
    """The INTA cycle on behalf of the vCPU: the vector of the best request, now in service.

    Nothing to deliver gives the spurious IRQ 7 of the chip that had nothing.
    """
    with s.lock:
        s.output = False
        master, slave = s.pics
        irq = master.get_irq()
        if irq >= 0:
            master.intack(irq)
            if irq == PIC_CASCADE_IRQ:
                irq2 = slave.get_irq()
                if irq2 >= 0:
                    slave.intack(irq2)
                else:
                    irq2 = 7
                intno = slave.irq_base + irq2
            else:
                intno = master.irq_base + irq
        else:
            intno = master.irq_base + 7
        pic_update_irq(s)
    s.unlock_and_wake()
    return intno


@traced(args=lambda s, port, value: {"port": port, "value": value})
def picdev_write(s: KvmPic, port: int, value: int) -> None:
    """A guest OUT to 0x20/0x21, 0xa0/0xa1 or the ELCR ports 0x4d0/0x4d1."""
    with s.lock:
        if port in ELCR_PORTS:
            chip = s.pics[ELCR_PORTS[port]]
            chip.elcr = value & chip.elcr_mask
        else:
            index, offset = PIC_PORTS[port]
            s.pics[index].ioport_write(offset, value)
    s.unlock_and_wake()


@traced(args=lambda s, port: {"port": port})
def picdev_read(s: KvmPic, port: int) -> int:
    with s.lock:
        if port in ELCR_PORTS:
            value = s.pics[ELCR_PORTS[port]].elcr
        else:
            index, offset = PIC_PORTS[port]
            value = s.pics[index].ioport_read(offset)
    s.unlock_and_wake()
    return value & 0xFF


def kvm_get_pic_state(s: KvmPic, index: int) -> kvm_pic_state:
    """KVM_GET_IRQCHIP for chip 0 (master) or 1 (slave)."""
    chip = s.pics[index]
    with s.lock:
        return kvm_pic_state(*(int(getattr(chip, name)) for name in PIC_STATE_FIELDS))


def kvm_set_pic_state(s: KvmPic, index: int, state: kvm_pic_state) -> None:
    """KVM_SET_IRQCHIP: every register as given, then the output is recomputed."""
    chip = s.pics[index]
    with s.lock:
        for name in PIC_STATE_FIELDS:
            setattr(chip, name, getattr(state, name))
        pic_update_irq(s)
    s.unlock_and_wake()
