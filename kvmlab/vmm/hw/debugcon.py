"""The debug console on port 0xe9 ("port E9 hack" of Bochs and QEMU's isa-debugcon).

Each byte the guest writes is output at once, with no UART to program: the simplest way for
early boot code to print. A read returns 0xe9, which is how a guest detects the port.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/char/debugcon.c
"""

from __future__ import annotations

from collections.abc import Callable

from kvmlab.vmm.memory import Device

DEBUGCON_IOBASE = 0xE9
DEBUGCON_READBACK = 0xE9


class DebugCon(Device):
    """Bytes written go to `output` and `on_output`; reads return 0xe9."""

    name = "debugcon"

    def __init__(self, on_output: Callable[[bytes], None] | None = None) -> None:
        self.on_output = on_output
        self.output = bytearray()

    def read(self, offset: int, size: int) -> int:
        return DEBUGCON_READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        byte = bytes([value & 0xFF])  # only the low byte is sent, whatever the access size
        self.output += byte
        if self.on_output is not None:
            self.on_output(byte)

    def text(self) -> str:
        return self.output.decode(errors="replace")
