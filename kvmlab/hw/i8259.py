"""The core of one 8259A interrupt controller, shared by KVM's and QEMU's models.

Linux's arch/x86/kvm/i8259.c and QEMU's hw/intc/i8259.c grew from one emulation and still agree
on the chip's registers (the fields of `struct kvm_pic_state`), on how a request is latched,
prioritised, acknowledged and ended, and on OCW2/OCW3. They differ in what ICW1 resets, in a
poll read with nothing pending, in the special mask mode and in how the pair is wired; each
subclass supplies those (`update_irq`, `icw1`, `poll_read`, `clear_isr`).
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/i8259.c
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/intc/i8259.c
"""

from __future__ import annotations

PIC_CASCADE_IRQ = 2  # the master's line the slave's INT drives
ICW1, ICW1_IC4, ICW1_SNGL = 0x10, 0x01, 0x02
OCW3, OCW3_POLL, OCW3_RR, OCW3_RIS, OCW3_ESMM, OCW3_SMM = 0x08, 0x04, 0x02, 0x01, 0x40, 0x20
ELCR_MASK = (0xF8, 0xDE)  # lines that may be level-triggered: not 0, 1, 2 (master), 8, 13
PIC_STATE_FIELDS = (  # struct kvm_pic_state, in order
    "last_irr",
    "irr",
    "imr",
    "isr",
    "priority_add",
    "irq_base",
    "read_reg_select",
    "poll",
    "special_mask",
    "init_state",
    "auto_eoi",
    "rotate_on_auto_eoi",
    "special_fully_nested_mode",
    "init4",
    "elcr",
    "elcr_mask",
)


def get_priority(pending: int, priority_add: int) -> int:
    """How far (0 best .. 7) the best line in `pending` is from the top priority; 8 if none."""
    if not pending:
        return 8
    priority = 0
    while not pending & (1 << ((priority + priority_add) & 7)):
        priority += 1
    return priority


class PicChipCore:
    """One 8259A's registers and the logic both models share."""

    # QEMU lets the special mask mode hide masked lines from the in-service priority; KVM not.
    SPECIAL_MASK_HIDES_ISR = False

    def __init__(self, master: bool) -> None:
        self.master = master
        self.elcr_mask = ELCR_MASK[0 if master else 1]
        self.elcr = 0
        self.last_irr = self.irr = self.imr = self.isr = 0
        self.priority_add = self.irq_base = 0
        self.read_reg_select = self.poll = self.special_mask = False
        self.init_state = 0  # 0: operational; 1, 2, 3: expecting ICW2, ICW3, ICW4
        self.init4 = self.single_mode = False
        self.auto_eoi = self.rotate_on_auto_eoi = self.special_fully_nested_mode = False

    # --- what each model decides ---------------------------------------------------------

    def update_irq(self) -> None:
        """Recompute the INT output after a register changed."""
        raise NotImplementedError

    def icw1(self, value: int) -> None:
        """A write of ICW1 (bit 4 set at port 0): start initialisation."""
        raise NotImplementedError

    def poll_read(self) -> int:
        """A read after an OCW3 poll command: acknowledge the best request, say which."""
        raise NotImplementedError

    def clear_isr(self, line: int) -> None:
        """End `line`'s service (KVM also tells its ack notifiers here)."""
        self.isr &= ~(1 << line)

    # --- inputs ----------------------------------------------------------------------------

    def set_irq1(self, line: int, level: bool) -> int:
        """Input `line` (0-7) is now at `level`: an edge (or, with ELCR, a level) latches a
        request. Returns 0 if the request was already latched (coalesced), else 1."""
        mask = 1 << line
        ret = 1
        if self.elcr & mask:
            if level:
                ret = int(not self.irr & mask)
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:
            if not self.last_irr & mask:
                ret = int(not self.irr & mask)
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        return ret

    def get_irq(self) -> int:
        """The line this chip would deliver now, or -1 (masked, or outranked by ISR)."""
        priority = get_priority(self.irr & ~self.imr, self.priority_add)
        if priority == 8:
            return -1
        in_service = self.isr
        if self.SPECIAL_MASK_HIDES_ISR and self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested_mode and self.master:
            in_service &= ~(1 << PIC_CASCADE_IRQ)
        if priority < get_priority(in_service, self.priority_add):
            return (priority + self.priority_add) & 7
        return -1

    def intack(self, line: int) -> None:
        """The CPU took `line`: in service (auto-EOI ends it at once); an edge is consumed."""
        self.isr |= 1 << line
        if not self.elcr & (1 << line):
            self.irr &= ~(1 << line)
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (line + 1) & 7
            self.clear_isr(line)

    # --- the ports -------------------------------------------------------------------------

    def ioport_write(self, offset: int, value: int) -> None:
        """A guest write to port 0 (ICW1, OCW2, OCW3) or 1 (OCW1, ICW2-4) of this chip."""
        value &= 0xFF
        if offset == 0:
            if value & ICW1:
                self.icw1(value)
            elif value & OCW3:
                self.ocw3(value)
            else:
                self.ocw2(value)
        elif self.init_state == 0:
            self.ocw1(value)
        elif self.init_state == 1:  # ICW2: the vector base (its low three bits are the line)
            self.irq_base = value & 0xF8
            self.init_state = (3 if self.init4 else 0) if self.single_mode else 2
        elif self.init_state == 2:  # ICW3: the cascade wiring, fixed on a PC
            self.init_state = 3 if self.init4 else 0
        else:  # ICW4
            self.special_fully_nested_mode = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def ocw1(self, value: int) -> None:
        """OCW1: the interrupt mask (KVM also tells its mask notifiers of each line changed)."""
        self.imr = value
        self.update_irq()

    def ocw3(self, value: int) -> None:
        """OCW3: poll, which register port 0 reads, the special mask mode."""
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_reg_select = bool(value & OCW3_RIS)
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)

    def ocw2(self, value: int) -> None:
        """OCW2: the EOI and rotation commands (bits 7-5), with a line in bits 2-0."""
        command = value >> 5
        if command in (0, 4):  # clear / set rotate in auto-EOI mode
            self.rotate_on_auto_eoi = bool(command >> 2)
        elif command in (1, 5):  # non-specific EOI (and rotate)
            priority = get_priority(self.isr, self.priority_add)
            if priority != 8:
                line = (priority + self.priority_add) & 7
                if command == 5:
                    self.priority_add = (line + 1) & 7
                self.clear_isr(line)
                self.update_irq()
        elif command == 3:  # specific EOI
            self.clear_isr(value & 7)
            self.update_irq()
        elif command == 6:  # set priority: the named line becomes the lowest
            self.priority_add = (value + 1) & 7
            self.update_irq()
        elif command == 7:  # rotate on specific EOI
            line = value & 7
            self.priority_add = (line + 1) & 7
            self.clear_isr(line)
            self.update_irq()

    def ioport_read(self, offset: int) -> int:
        """A guest read: the poll answer, else IRR or ISR (port 0, as OCW3 chose) or IMR."""
        if self.poll:
            self.poll = False
            return self.poll_read()
        if offset == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr
