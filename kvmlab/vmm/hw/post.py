"""Port 0x80, where PC firmware and kernels write power-on self-test (POST) codes.

QEMU ignores these writes (and Linux uses the port only as a short delay); kvmlab keeps the
codes, like the two-digit display of a POST card, so a notebook can show a guest's progress.
Reads return 0xff, as QEMU's ioport80 does.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/i386/pc.c (ioport80_read/write)
"""

from __future__ import annotations

from kvmlab.vmm.memory import Device

POST_IOBASE = 0x80
POST_HISTORY = 256  # codes kept, newest last


class PostPort(Device):
    """The POST card: `code` is the last byte written, `codes` the recent ones."""

    name = "post"

    def __init__(self) -> None:
        self.codes: list[int] = []

    @property
    def code(self) -> int | None:
        return self.codes[-1] if self.codes else None

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.codes.append(value & 0xFF)
        del self.codes[:-POST_HISTORY]

    def reset(self) -> None:
        self.codes.clear()
