"""IoBus / MmioBus: mapping ranges to devices, refusing overlaps, and splitting accesses."""

from __future__ import annotations

import pytest

from kvmlab.vmm.hw import ScratchDevice
from kvmlab.vmm.memory import Device, IoBus, MmioBus, address_space_rw


class Recorder(Device):
    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.calls.append(("read", offset, size, 0))
        return 0x1122334455667788

    def write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("write", offset, size, value))


def test_a_device_sees_offsets_relative_to_its_base() -> None:
    bus = IoBus()
    dev = bus.register(0x3F8, 8, Recorder())
    bus.write(0x3FB, 1, 0x80)
    bus.read(0x3F8, 1)
    assert dev.calls == [("write", 3, 1, 0x80), ("read", 0, 1, 0)]


def test_reads_are_truncated_to_the_access_size() -> None:
    bus = IoBus()
    bus.register(0x60, 4, Recorder())
    assert bus.read(0x60, 2) == 0x7788


@pytest.mark.parametrize(("base", "length"), [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x300, 0x200)])
def test_overlapping_ranges_are_refused(base: int, length: int) -> None:
    bus = IoBus()
    bus.register(0x3F8, 8, Recorder())
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(base, length, Recorder())


def test_adjacent_ranges_are_fine() -> None:
    bus = IoBus()
    bus.register(0x3F8, 8, Recorder())
    bus.register(0x3F0, 8, Recorder())
    bus.register(0x400, 1, Recorder())
    assert [m.base for m in bus.mappings] == [0x3F0, 0x3F8, 0x400]


def test_an_unclaimed_port_reads_all_ones_and_ignores_writes() -> None:
    bus = IoBus()
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 4) == 0xFFFFFFFF
    bus.write(0x80, 1, 0x12)


def test_an_unclaimed_mmio_address_reads_zero() -> None:
    assert MmioBus().read(0xD0000000, 8) == 0


def test_unregister_frees_the_range() -> None:
    bus = MmioBus()
    dev = bus.register(0x1000, 0x100, ScratchDevice())
    bus.unregister(dev)
    assert bus.find(0x1000) is None
    bus.register(0x1000, 0x100, ScratchDevice())


def test_an_mmio_access_of_an_odd_length_is_split_into_bytes() -> None:
    bus = MmioBus()
    dev = bus.register(0x1000, 0x100, ScratchDevice())
    bus.write(0x1010, 3, 0xABCDEF)
    assert dev.accesses == [
        ("write", 0x10, 1, 0xEF),
        ("write", 0x11, 1, 0xCD),
        ("write", 0x12, 1, 0xAB),
    ]
    assert bus.read(0x1010, 3) == 0xABCDEF


def test_address_space_rw_fills_the_buffer_on_a_read_and_takes_it_on_a_write() -> None:
    bus = MmioBus()
    bus.register(0x1000, 0x100, ScratchDevice())
    buf = bytearray(b"\x01\x02\x03\x04")
    address_space_rw(bus, 0x1008, memoryview(buf), is_write=True)
    out = bytearray(4)
    address_space_rw(bus, 0x1008, memoryview(out), is_write=False)
    assert out == b"\x01\x02\x03\x04"
