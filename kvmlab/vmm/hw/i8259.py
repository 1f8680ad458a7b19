"""The two cascaded 8259A interrupt controllers of a PC, with QEMU's semantics (hw/intc/i8259.c).

Each chip latches its eight input lines in IRR, masks them with IMR and, when the best unmasked
request outranks everything in service (ISR), raises its INT output. The slave's INT is wired
to the master's line 2. The CPU acknowledges with `pic_read_irq` (the INTA cycle), which moves
the line from IRR to ISR and returns the vector: the chip's base from ICW2 plus the line. The
guest programs the chips through ports 0x20/0x21 (master) and 0xa0/0xa1 (slave): the ICW1-4
initialisation sequence, OCW1 (mask), OCW2 (EOI, rotation) and OCW3 (which register a read
returns, poll, special mask). ELCR (0x4d0/0x4d1) makes a line level-triggered.

The chip's core is shared with the simulated kernel's in-kernel PIC (`kvmlab.hw.i8259`); what
is QEMU's own lives here: ICW1's reset, the poll read, the special mask mode, the wiring.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/intc/i8259.c
"""

from __future__ import annotations

from collections.abc import Callable

from kvmlab.hw.i8259 import ICW1_IC4, ICW1_SNGL, PIC_CASCADE_IRQ, PicChipCore, get_priority
from kvmlab.vmm.memory import Device

__all__ = ["I8259", "PIC_ELCR_IOBASE", "PIC_MASTER_IOBASE", "PIC_SLAVE_IOBASE", "get_priority"]

PIC_MASTER_IOBASE, PIC_SLAVE_IOBASE, PIC_ELCR_IOBASE = 0x20, 0xA0, 0x4D0


class PicChip(PicChipCore, Device):
    """One 8259A: its registers, its initialisation state machine and its INT output."""

    SPECIAL_MASK_HIDES_ISR = True

    def __init__(self, name: str, master: bool, on_int: Callable[[bool], None]) -> None:
        super().__init__(master)
        self.name = name
        self.on_int = on_int  # the INT output pin changed
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
        self.init_state = 0
        self.init4 = self.single_mode = False
        self.auto_eoi = self.rotate_on_auto_eoi = self.special_fully_nested_mode = False
        self.update_irq()

    def icw1(self, value: int) -> None:
        self._init_reset()
        self.init_state = 1
        self.init4 = bool(value & ICW1_IC4)
        self.single_mode = bool(value & ICW1_SNGL)

    # --- inputs and the INT output ----------------------------------------------------------

    def set_irq(self, line: int, level: bool) -> None:
        """Input `line` (0-7) changed: an edge (or, with ELCR, a level) becomes a request."""
        self.set_irq1(line, level)
        self.update_irq()

    def update_irq(self) -> None:
        """Drive INT from get_irq(); only a change is passed on."""
        level = self.get_irq() >= 0
        if level != self.int_out:
            self.int_out = level
            self.on_int(level)

    def intack(self, line: int) -> None:
        super().intack(line)
        self.update_irq()

    # --- the ports ------------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        self.ioport_write(offset, value)

    def read(self, offset: int, size: int) -> int:
        return self.ioport_read(offset)

    def poll_read(self) -> int:
        """A poll read acknowledges like INTA, without a vector; nothing pending reads 0."""
        line = self.get_irq()
        if line < 0:
            return 0
        self.intack(line)
        return line | 0x80


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
