"""A scratch register file on the MMIO bus: the smallest useful memory-mapped device.

Each byte of its window reads back what was last written there (little-endian for wider
accesses), and `accesses` records every (kind, offset, size, value): enough to watch a guest
poke device registers through MMIO exits.
"""

from __future__ import annotations

from kvmlab.vmm.memory import MmioDevice


class ScratchDevice(MmioDevice):
    """`size` bytes of read/write registers, reset to zero."""

    name = "scratch"

    def __init__(self, size: int = 0x100) -> None:
        self.size = size
        self.regs = bytearray(size)
        self.accesses: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        value = int.from_bytes(self.regs[offset : offset + size].ljust(size, b"\0"), "little")
        self.accesses.append(("read", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little")[: max(self.size - offset, 0)]
        self.regs[offset : offset + len(data)] = data
        self.accesses.append(("write", offset, size, value))

    def reset(self) -> None:
        self.regs[:] = bytes(self.size)
        self.accesses.clear()
