"""The 8259 pair alone: initialisation, masking, priority, EOI, cascade, poll, ELCR."""

from __future__ import annotations

import pytest

from kvmlab.vmm.hw.i8259 import I8259, get_priority


class Pic:
    """An I8259 with its INT pin recorded and helpers for the guest's port writes."""

    def __init__(self) -> None:
        self.int_levels: list[bool] = []
        self.pic = I8259(on_int=self.int_levels.append)

    def out(self, port: int, value: int) -> None:
        chip = self.pic.master if port < 0xA0 else self.pic.slave
        chip.write(port & 1, 1, value)

    def inb(self, port: int) -> int:
        chip = self.pic.master if port < 0xA0 else self.pic.slave
        return chip.read(port & 1, 1)

    def init_like_linux(self, master_mask: int = 0xFB, slave_mask: int = 0xFF) -> None:
        for port, base, icw3 in ((0x20, 0x20, 0x04), (0xA0, 0x28, 0x02)):
            self.out(port, 0x11)
            self.out(port + 1, base)
            self.out(port + 1, icw3)
            self.out(port + 1, 0x01)
        self.out(0x21, master_mask)
        self.out(0xA1, slave_mask)

    @property
    def int_out(self) -> bool:
        return self.pic.int_out


def test_priority_counts_from_the_rotation_point() -> None:
    assert get_priority(0, 0) == 8
    assert get_priority(0b1000_0001, 0) == 0
    assert get_priority(0b1000_0001, 1) == 6  # line 7 is 6 places after line 1
    assert get_priority(0b0000_0100, 3) == 7


def test_an_edge_on_an_unmasked_line_raises_int_and_inta_gives_base_plus_line() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0xEF)  # only IRQ 4
    p.pic.set_irq(4, True)
    assert p.int_out
    assert p.inb(0x20) == 1 << 4  # IRR
    assert p.pic.pic_read_irq() == 0x24
    assert not p.int_out  # in service now; nothing else pending
    p.out(0x20, 0x0B)  # OCW3: read ISR
    assert p.inb(0x20) == 1 << 4
    p.out(0x20, 0x20)  # non-specific EOI
    assert p.inb(0x20) == 0


def test_a_masked_line_is_latched_and_delivered_when_unmasked() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0xFF)
    p.pic.set_irq(0, True)
    assert not p.int_out
    assert p.inb(0x21) == 0xFF  # IMR
    p.out(0x21, 0xFE)
    assert p.int_out
    assert p.pic.pic_read_irq() == 0x20


def test_edge_triggered_lines_need_a_new_edge() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.set_irq(3, True)
    assert p.pic.pic_read_irq() == 0x23
    p.out(0x20, 0x20)
    p.pic.set_irq(3, True)  # still high: no new request
    assert not p.int_out
    p.pic.set_irq(3, False)
    p.pic.set_irq(3, True)
    assert p.int_out


def test_a_lower_priority_request_waits_for_the_eoi_of_a_higher_one() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.set_irq(1, True)
    assert p.pic.pic_read_irq() == 0x21
    p.pic.set_irq(5, True)
    assert not p.int_out  # IRQ 1 in service outranks IRQ 5
    p.pic.set_irq(0, True)
    assert p.int_out  # IRQ 0 outranks it: nesting
    assert p.pic.pic_read_irq() == 0x20
    p.out(0x20, 0x20)  # EOI ends IRQ 0, the highest in service
    assert not p.int_out
    p.out(0x20, 0x61)  # specific EOI for IRQ 1
    assert p.int_out
    assert p.pic.pic_read_irq() == 0x25


def test_slave_lines_arrive_through_the_cascade() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0xFB, slave_mask=0xEF)  # IRQ 12 = slave line 4
    p.pic.set_irq(12, True)
    assert p.int_out
    assert p.pic.pic_read_irq() == 0x2C
    p.out(0xA0, 0x20)
    p.out(0x20, 0x20)
    assert not p.int_out
    with pytest.raises(ValueError, match="no ISA interrupt line 16"):
        p.pic.set_irq(16, True)


def test_a_request_gone_before_inta_is_spurious_irq_7() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.set_irq(3, True)
    p.out(0x21, 0xFF)  # masked again before the CPU acknowledged
    assert p.pic.pic_read_irq() == 0x27
    p.out(0x20, 0x0B)
    assert p.inb(0x20) == 0  # a spurious IRQ 7 is not put in service


def test_auto_eoi_leaves_nothing_in_service() -> None:
    p = Pic()
    p.out(0x20, 0x13)  # single PIC, ICW4 needed
    p.out(0x21, 0x08)
    p.out(0x21, 0x03)  # ICW4: 8086 mode, auto-EOI
    p.out(0x21, 0x00)
    p.pic.set_irq(3, True)
    assert p.pic.pic_read_irq() == 0x0B
    p.out(0x20, 0x0B)
    assert p.inb(0x20) == 0


def test_poll_mode_acknowledges_without_a_vector() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.set_irq(6, True)
    p.out(0x20, 0x0C)  # OCW3: poll
    assert p.inb(0x20) == 0x80 | 6
    p.out(0x20, 0x0C)
    assert p.inb(0x20) == 0  # nothing else pending


def test_rotation_makes_the_serviced_line_the_lowest() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.set_irq(2, True)
    p.pic.pic_read_irq()
    p.out(0x20, 0xA0)  # rotate on non-specific EOI: line 3 is now the highest
    p.pic.set_irq(1, True)
    p.pic.set_irq(4, True)
    assert p.pic.pic_read_irq() == 0x24


def test_elcr_makes_a_line_level_triggered() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.elcr.write(0, 1, 0xFF)
    assert p.pic.elcr.read(0, 1) == 0xF8  # lines 0, 1 and 2 stay edge-triggered
    p.pic.set_irq(5, True)
    assert p.pic.pic_read_irq() == 0x25
    p.out(0x20, 0x20)
    assert p.int_out  # still asserted: a level request comes straight back
    p.pic.set_irq(5, False)
    assert not p.int_out


def test_a_slave_request_withdrawn_after_the_cascade_edge_is_the_slaves_spurious_7() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00, slave_mask=0x00)
    p.pic.elcr.write(1, 1, 0xFF)
    assert p.pic.elcr.read(1, 1) == 0xDE  # lines 8 and 13 stay edge-triggered
    p.pic.set_irq(9, True)
    p.pic.set_irq(9, False)  # the master latched the cascade line's edge
    assert p.int_out
    assert p.pic.pic_read_irq() == 0x2F


def test_reset_clears_the_programming() -> None:
    p = Pic()
    p.init_like_linux(master_mask=0x00)
    p.pic.set_irq(0, True)
    p.pic.reset()
    assert not p.int_out
    assert (p.inb(0x20), p.inb(0x21), p.pic.master.irq_base) == (0, 0, 0)
