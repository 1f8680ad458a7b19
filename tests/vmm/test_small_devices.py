"""isa-debug-exit, the 0xe9 debug console and the scratch MMIO register file."""

from __future__ import annotations

import pytest

from kvmlab.vmm.hw import DebugCon, DebugExit, ScratchDevice


def test_debug_exit_turns_the_written_value_into_qemus_exit_code() -> None:
    codes: list[int] = []
    dev = DebugExit(on_exit=codes.append)
    dev.write(0, 1, 0x10)
    assert (dev.value, dev.code, codes) == (0x10, 0x21, [0x21])


def test_debug_exit_reads_as_zero() -> None:
    assert DebugExit().read(0, 1) == 0


def test_debugcon_prints_the_low_byte_of_each_write_and_reads_back_0xe9() -> None:
    got: list[bytes] = []
    con = DebugCon(on_output=got.append)
    con.write(0, 1, ord("o"))
    con.write(0, 2, 0x4B4B)
    assert (con.output, got, con.text()) == (b"oK", [b"o", b"K"], "oK")
    assert con.read(0, 1) == 0xE9


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_scratch_registers_read_back_what_was_written_at_every_width(size: int) -> None:
    dev = ScratchDevice(0x20)
    value = 0x0102030405060708 & ((1 << (8 * size)) - 1)
    dev.write(0x8, size, value)
    assert dev.read(0x8, size) == value
    assert dev.regs[8 : 8 + size] == value.to_bytes(size, "little")


def test_scratch_registers_are_little_endian_across_widths_and_reset_to_zero() -> None:
    dev = ScratchDevice()
    dev.write(0, 4, 0x12345678)
    assert dev.read(0, 1) == 0x78
    assert dev.read(2, 2) == 0x1234
    dev.reset()
    assert dev.read(0, 8) == 0
    assert dev.accesses == [("read", 0, 8, 0)]
