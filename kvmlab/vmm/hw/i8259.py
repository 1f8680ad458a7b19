"""The two cascaded 8259A interrupt controllers of a PC, with QEMU's semantics (hw/intc/i8259.c).

Each chip latches its eight input lines in IRR, masks them with IMR and, when the best unmasked
request outranks everything in service (ISR), raises its INT output. The slave's INT is wired
to the master's line 2. The CPU acknowledges with `pic_read_irq` (the INTA cycle), which moves
the line from IRR to ISR and returns the vector: the chip's base from ICW2 plus the line. The
guest programs the chips through ports 0x20/0x21 (master) and 0xa0/0xa1 (slave): the ICW1-4
initialisation sequence, OCW1 (mask), OCW2 (EOI, rotation) and OCW3 (which register a read
returns, poll, special mask). ELCR (0x4d0/0x4d1) makes a line level-triggered.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/intc/i8259.c
"""

from __future__ import annotations

from collections.abc import Callable

from kvmlab.vmm.memory import Device

PIC_MASTER_IOBASE, PIC_SLAVE_IOBASE, PIC_ELCR_IOBASE = 0x20, 0xA0, 0x4D0
PIC_CASCADE_IRQ = 2  # the master's line the slave's INT drives
ICW1, ICW1_IC4, ICW1_SNGL = 0x10, 0x01, 0x02
OCW3, OCW3_POLL, OCW3_RR, OCW3_RIS, OCW3_ESMM, OCW3_SMM = 0x08, 0x04, 0x02, 0x01, 0x40, 0x20
ELCR_MASK = (0xF8, 0xDE)  # lines that may be level-triggered: not 0, 1, 2 (master), 8, 13


def get_priority(pending: int, priority_add: int) -> int:
    """How far (0 best .. 7) the best line in `pending` is from the top priority; 8 if none."""
    if not pending:
        return 8
    priority = 0
    while not pending & (1 << ((priority + priority_add) & 7)):
        priority += 1
    return priority


class PicChip(Device):
    """One 8259A: its registers, its initialisation state machine and its INT output."""

    def __init__(self, name: str, master: bool, on_int: Callable[[bool], None]) -> None:
        self.name = name
        self.master = master
        self.on_int = on_int  # the INT output pin changed
        self.elcr = 0  # edge/level control (from the ELCR ports, kept across ICW1)
        self.elcr_mask = ELCR_MASK[0 if master else 1]
        self.int_out = False
        self.reset()

    def reset(self) -> None:
        """Power-on state; ICW1 does the same (pic_init_reset) except for ELCR and edge IRR."""
        self.elcr = 0
        self.irr = 0
        self._init_reset()

    def _init_reset(self) -> None:
        self.last_irr = 0  # input levels seen last (edge detection)
        self.irr &= self.elcr  # a level-triggered request survives re-initialisation
        self.imr = self.isr = 0
        self.priority_add = 0  # rotation: which line has the top priority
        self.irq_base = 0
        self.read_reg_select = False  # OCW3 RR/RIS: a read of port 0 gives ISR, else IRR
        self.poll = self.special_mask = False
        self.init_state = 0  # 0: operational; 1, 2, 3: expecting ICW2, ICW3, ICW4
        self.init4 = self.single_mode = False
        self.auto_eoi = self.rotate_on_auto_eoi = self.special_fully_nested_mode = False
        self.update_irq()

    # --- inputs and the INT output ----------------------------------------------------------

    def set_irq(self, line: int, level: bool) -> None:
        """Input `line` (0-7) changed: an edge (or, with ELCR, a level) becomes a request."""
        mask = 1 << line
        if self.elcr & mask:
            self.irr = self.irr | mask if level else self.irr & ~mask
            self.last_irr = self.last_irr | mask if level else self.last_irr & ~mask
        elif level:
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        self.update_irq()

    def get_irq(self) -> int:
        """The line this chip would deliver now, or -1 (masked, or outranked by ISR)."""
        priority = get_priority(self.irr & ~self.imr, self.priority_add)
        if priority == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested_mode and self.master:
            in_service &= ~(1 << PIC_CASCADE_IRQ)
        if priority < get_priority(in_service, self.priority_add):
            return (priority + self.priority_add) & 7
        return -1

    def update_irq(self) -> None:
        """Drive INT from get_irq(); only a change is passed on."""
        level = self.get_irq() >= 0
        if level != self.int_out:
            self.int_out = level
            self.on_int(level)

    def intack(self, line: int) -> None:
        """The CPU took `line`: in service (unless auto-EOI); an edge request is consumed."""
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (line + 1) & 7
        else:
            self.isr |= 1 << line
        if not self.elcr & (1 << line):
            self.irr &= ~(1 << line)
        self.update_irq()

    # --- the ports ------------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            if value & ICW1:
                self._init_reset()
                self.init_state = 1
                self.init4 = bool(value & ICW1_IC4)
                self.single_mode = bool(value & ICW1_SNGL)
            elif value & OCW3:
                if value & OCW3_POLL:
                    self.poll = True
                if value & OCW3_RR:
                    self.read_reg_select = bool(value & OCW3_RIS)
                if value & OCW3_ESMM:
                    self.special_mask = bool(value & OCW3_SMM)
            else:
                self._ocw2(value)
        elif self.init_state == 0:  # OCW1
            self.imr = value
            self.update_irq()
        elif self.init_state == 1:  # ICW2: the vector base (its low three bits are the line)
            self.irq_base = value & 0xF8
            self.init_state = (3 if self.init4 else 0) if self.single_mode else 2
        elif self.init_state == 2:  # ICW3: the cascade wiring, fixed on a PC
            self.init_state = 3 if self.init4 else 0
        else:  # ICW4
            self.special_fully_nested_mode = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def _ocw2(self, value: int) -> None:
        """OCW2: the EOI and rotation commands (bits 7-5), with a line in bits 2-0."""
        command = value >> 5
        if command in (0, 4):  # clear / set rotate in auto-EOI mode
            self.rotate_on_auto_eoi = bool(command >> 2)
        elif command in (1, 5):  # non-specific EOI (and rotate)
            priority = get_priority(self.isr, self.priority_add)
            if priority != 8:
                line = (priority + self.priority_add) & 7
                self.isr &= ~(1 << line)
                if command == 5:
                    self.priority_add = (line + 1) & 7
                self.update_irq()
        elif command == 3:  # specific EOI
            self.isr &= ~(1 << (value & 7))
            self.update_irq()
        elif command == 6:  # set priority: the named line becomes the lowest
            self.priority_add = (value + 1) & 7
            self.update_irq()
        elif command == 7:  # rotate on specific EOI
            line = value & 7
            self.isr &= ~(1 << line)
            self.priority_add = (line + 1) & 7
            self.update_irq()

    def read(self, offset: int, size: int) -> int:
        if self.poll:  # a poll read acknowledges like INTA, without a vector
            self.poll = False
            line = self.get_irq()
            if line < 0:
                return 0
            self.intack(line)
            return line | 0x80
        if offset == 0:
            return self.isr if self.read_reg_select else self.irr
        return self.imr


class Elcr(Device):
    """Ports 0x4d0/0x4d1: the edge/level control registers of the master and the slave."""

    name = "elcr"

    def __init__(self, chips: tuple[PicChip, PicChip]) -> None:
        self.chips = chips

    def read(self, offset: int, size: int) -> int:
        return self.chips[offset].elcr

    def write(self, offset: int, size: int, value: int) -> None:
        chip = self.chips[offset]
        chip.elcr = value & chip.elcr_mask


class I8259:
    """The PC's pair: ISA lines 0-7 on the master, 8-15 on the slave, INT to the CPU."""

    def __init__(self, on_int: Callable[[bool], None]) -> None:
        self.master = PicChip("pic-master", True, on_int)
        self.slave = PicChip(
            "pic-slave", False, lambda level: self.master.set_irq(PIC_CASCADE_IRQ, level)
        )
        self.elcr = Elcr((self.master, self.slave))

    def set_irq(self, irq: int, level: bool) -> None:
        """ISA line `irq` (0-15) is now at `level`."""
        if not 0 <= irq < 16:
            raise ValueError(f"no ISA interrupt line {irq}")
        chip = self.master if irq < 8 else self.slave
        chip.set_irq(irq & 7, level)

    def pic_read_irq(self) -> int:
        """The INTA cycle: the vector of the best request, now in service.

        With nothing to deliver (the request went away since INT rose) the chip answers with
        a spurious IRQ 7, as hardware does.
        """
        line = self.master.get_irq()
        if line < 0:
            return self.master.irq_base + 7
        if line == PIC_CASCADE_IRQ:
            slave_line = self.slave.get_irq()
            if slave_line >= 0:
                self.slave.intack(slave_line)
            else:
                slave_line = 7
            vector = self.slave.irq_base + slave_line
        else:
            vector = self.master.irq_base + line
        self.master.intack(line)
        return vector

    @property
    def int_out(self) -> bool:
        return self.master.int_out

    def reset(self) -> None:
        self.slave.reset()
        self.master.reset()
