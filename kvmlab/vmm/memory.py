"""Address spaces and device models' common face: QEMU's memory API cut down to a bus.

An `IoBus` (x86 port space, QEMU's `address_space_io`) and an `MmioBus` (the guest-physical
space outside RAM, `address_space_memory`) map address ranges to devices; `address_space_rw`
turns an access from an IO or MMIO exit into `device.read(offset, size)` or
`device.write(offset, size, value)`. Devices never see KVM: they are plain objects tested alone.
https://gitlab.com/qemu-project/qemu/-/blob/master/system/physmem.c (address_space_rw)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TypeVar


class Device:
    """A device model: registers read and written at an offset into its address range."""

    name = "device"

    def read(self, offset: int, size: int) -> int:
        """The value of a `size`-byte read at `offset` (unclaimed registers read as zero)."""
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A `size`-byte write of `value` at `offset` (unclaimed registers ignore it)."""

    def reset(self) -> None:
        """Back to the power-on state (machine reset)."""


class MmioDevice(Device):
    """A memory-mapped device: accesses of 1, 2, 4 or 8 bytes, little-endian.

    The bus splits any other length into single bytes, as QEMU's memory core adjusts an
    access to the sizes a region accepts.
    """

    name = "mmio-device"
    access_sizes = (1, 2, 4, 8)


@dataclass(frozen=True, slots=True)
class Mapping:
    """A device placed at [base, base + length) on a bus."""

    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


D = TypeVar("D", bound=Device)


class Bus:
    """Address ranges mapped to devices; overlapping ranges are refused."""

    name = "bus"
    unassigned_read = 0  # what a read from an address no device claims returns (per byte)

    def __init__(self) -> None:
        self._mappings: list[Mapping] = []  # sorted by base
        self._bases: list[int] = []

    def register(self, base: int, length: int, device: D) -> D:
        """Map `device` at [base, base + length); ValueError if that overlaps another device."""
        if length <= 0 or base < 0:
            raise ValueError(f"{self.name}: bad range {base:#x}+{length:#x}")
        i = bisect.bisect_left(self._bases, base)
        for neighbour in self._mappings[max(i - 1, 0) : i + 1]:
            if base < neighbour.end and neighbour.base < base + length:
                raise ValueError(
                    f"{self.name}: {device.name} at {base:#x}+{length:#x} overlaps "
                    f"{neighbour.device.name} at {neighbour.base:#x}+{neighbour.length:#x}"
                )
        self._mappings.insert(i, Mapping(base, length, device))
        self._bases.insert(i, base)
        return device

    def unregister(self, device: Device) -> None:
        """Remove every mapping of `device`."""
        keep = [m for m in self._mappings if m.device is not device]
        self._mappings, self._bases = keep, [m.base for m in keep]

    def find(self, addr: int) -> Mapping | None:
        """The mapping that contains `addr`, if any."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._mappings[i].end:
            return self._mappings[i]
        return None

    @property
    def mappings(self) -> list[Mapping]:
        return list(self._mappings)

    def devices(self) -> list[Device]:
        return [m.device for m in self._mappings]

    def read(self, addr: int, size: int) -> int:
        """A read of `size` bytes at `addr`, as the guest sees it."""
        m = self.find(addr)
        if m is None:
            return int.from_bytes(bytes([self.unassigned_read]) * size, "little")
        if isinstance(m.device, MmioDevice) and size not in m.device.access_sizes:
            data = bytes(self.read(addr + i, 1) for i in range(size))
            return int.from_bytes(data, "little")
        return m.device.read(addr - m.base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        """A write of `size` bytes at `addr`; nothing happens where no device is."""
        m = self.find(addr)
        if m is None:
            return
        if isinstance(m.device, MmioDevice) and size not in m.device.access_sizes:
            for i, byte in enumerate(value.to_bytes(size, "little")):
                self.write(addr + i, 1, byte)
            return
        m.device.write(addr - m.base, size, value & ((1 << (8 * size)) - 1))


class IoBus(Bus):
    """The x86 port space (64 KiB of ports); unclaimed ports read as all ones, like ISA."""

    name = "io"
    unassigned_read = 0xFF


class MmioBus(Bus):
    """Guest-physical addresses outside RAM; unclaimed addresses read as zero, like QEMU."""

    name = "mmio"


def address_space_rw(bus: Bus, addr: int, buf: memoryview, is_write: bool) -> None:
    """One access of len(buf) bytes: a write takes its value from `buf`, a read fills `buf`."""
    size = len(buf)
    if is_write:
        bus.write(addr, size, int.from_bytes(buf, "little"))
    else:
        buf[:] = bus.read(addr, size).to_bytes(size, "little")
