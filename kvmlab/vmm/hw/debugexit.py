"""QEMU's isa-debug-exit: a port where the guest writes a value and the machine stops.

As in QEMU (`-device isa-debug-exit,iobase=0x501,iosize=2`), the exit code is
`(value << 1) | 1`, so a guest can never make the VMM look successful by accident; a test
harness maps its own "success" value to an odd code.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/misc/debugexit.c
"""

from __future__ import annotations

from collections.abc import Callable

from kvmlab.vmm.memory import Device

DEBUG_EXIT_IOBASE = 0x501
DEBUG_EXIT_IOSIZE = 2


class DebugExit(Device):
    """On a write: remember the value and call `on_exit((value << 1) | 1)`."""

    name = "isa-debug-exit"

    def __init__(self, on_exit: Callable[[int], None] | None = None) -> None:
        self.on_exit = on_exit
        self.value: int | None = None  # the last value the guest wrote
        self.code: int | None = None  # the exit code it asked for

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value
        self.code = (value << 1) | 1
        if self.on_exit is not None:
            self.on_exit(self.code)

    def reset(self) -> None:
        self.value = self.code = None
