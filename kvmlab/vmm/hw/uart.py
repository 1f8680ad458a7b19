"""What every UART model shares: the bytes it sent, the input waiting for it, one IRQ line.

A UART sits between a character backend (QEMU's CharBackend: here `output`, `on_output` and
`feed`) and the guest's registers, which each model (16550, PL011) lays out its own way.
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/include/chardev/char-fe.h
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager

from kvmlab.vmm.memory import Device


class Uart(Device):
    """`feed` types into the UART, `output`/`on_output` show what it sent, `on_irq(level)`
    follows its interrupt line. A model implements `_received` and the registers."""

    def __init__(
        self,
        on_output: Callable[[bytes], None] | None = None,
        on_irq: Callable[[bool], None] | None = None,
        lock: AbstractContextManager[object] | None = None,
    ) -> None:
        self.on_output = on_output
        self.on_irq = on_irq
        # The machine passes its big lock: feed() runs on a notebook's thread, reads on vCPUs.
        self._lock: AbstractContextManager[object] = lock if lock is not None else threading.RLock()
        self.output = bytearray()
        self.rx: deque[int] = deque()  # typed, not yet read by the guest
        self.irq_level = False
        self.reset()

    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read (what a user types)."""
        with self._lock:
            self.rx.extend(data)
            self._received()

    def text(self) -> str:
        """Everything the guest transmitted, decoded leniently."""
        return self.output.decode(errors="replace")

    def _received(self) -> None:
        """Input arrived in `rx`: update the model's flags and interrupt."""
        raise NotImplementedError

    def _send(self, byte: int) -> None:
        """A byte leaves the UART for the outside world (qemu_chr_fe_write_all)."""
        self.output.append(byte)
        if self.on_output is not None:
            self.on_output(bytes([byte]))

    def _set_irq(self, level: bool) -> None:
        """Drive the interrupt line; `on_irq` hears only of changes."""
        if level != self.irq_level:
            self.irq_level = level
            if self.on_irq is not None:
                self.on_irq(level)
