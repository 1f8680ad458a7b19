"""The Arm PL011 UART (QEMU's `virt` has one at 0x09000000), after QEMU's hw/char/pl011.c.

Transmission is instant: a write to UARTDR goes straight out (`output`, `on_output`) and
raises the TX interrupt. `feed(b"...")` types input, which moves into the receive FIFO (16
entries with LCR_H.FEN, else one) as the guest reads UARTDR; UARTFR shows RXFE/RXFF, and
TXFE is always set. The interrupt registers follow the TRM: RIS (raw), IMSC (mask),
MIS = RIS & IMSC, ICR (clear); the line is up while MIS is not zero. The PrimeCell ID
registers at 0xfe0-0xffc are what Linux's amba bus reads to bind its driver.
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/hw/char/pl011.c
https://developer.arm.com/documentation/ddi0183/latest/ (the PL011 TRM)
"""

from __future__ import annotations

from collections import deque

from kvmlab.vmm.hw.uart import Uart
from kvmlab.vmm.memory import MmioDevice

PL011_MMIO_SIZE = 0x1000

# register offsets
UARTDR = 0x000
UARTRSR = 0x004  # receive status (read) / error clear (write)
UARTFR = 0x018
UARTILPR = 0x020
UARTIBRD = 0x024
UARTFBRD = 0x028
UARTLCR_H = 0x02C
UARTCR = 0x030
UARTIFLS = 0x034
UARTIMSC = 0x038
UARTRIS = 0x03C
UARTMIS = 0x040
UARTICR = 0x044
UARTDMACR = 0x048
UARTPERIPHID0 = 0xFE0  # ..0xffc: PeriphID0-3, then PCellID0-3, one byte per word

# UARTFR
PL011_FLAG_CTS = 0x01
PL011_FLAG_DSR = 0x02
PL011_FLAG_DCD = 0x04
PL011_FLAG_BUSY = 0x08
PL011_FLAG_RXFE = 0x10
PL011_FLAG_TXFF = 0x20
PL011_FLAG_RXFF = 0x40
PL011_FLAG_TXFE = 0x80
# UARTLCR_H
LCR_FEN = 0x10  # FIFOs enabled
# UARTCR
CR_UARTEN = 0x001
CR_LBE = 0x080  # loopback
CR_TXE = 0x100
CR_RXE = 0x200
# interrupt bits (RIS, IMSC, MIS, ICR)
INT_RX = 0x010
INT_TX = 0x020
INT_RT = 0x040  # receive timeout (not raised here: input is never left waiting)
INT_E = 0x780  # framing, parity, break and overrun errors (never raised here)
INT_MS = 0x00F  # modem status changes (never raised here)
INT_ALL = 0x7FF

PL011_FIFO_DEPTH = 16
# PeriphID0-3 (part 0x011, designer Arm, revision 1) and PCellID0-3 (0xb105f00d)
PL011_ID_ARM = bytes([0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1])


class PL011(Uart, MmioDevice):
    """The PL011's registers (32-bit; byte accesses to UARTDR work too)."""

    name = "pl011"

    def reset(self) -> None:
        """Power-on state: transmitter and receiver enabled, UART off, no interrupts, FIFOs
        off and empty; typed input waiting is dropped."""
        with self._lock:
            self.fifo: deque[int] = deque()
            self.rsr = 0
            self.lcr = 0
            self.cr = CR_TXE | CR_RXE
            self.ifls = 0x12  # interrupt at half-full FIFOs
            self.ilpr = self.ibrd = self.fbrd = self.dmacr = 0
            self.int_enabled = 0
            self.int_level = 0
            self.rx.clear()
            self._update()

    # --- input ------------------------------------------------------------------------------

    def _fifo_depth(self) -> int:
        return PL011_FIFO_DEPTH if self.lcr & LCR_FEN else 1

    def _received(self) -> None:
        """Move typed bytes into the receive FIFO while it has room (QEMU's can_receive)."""
        arrived = False
        while self.rx and len(self.fifo) < self._fifo_depth():
            self.fifo.append(self.rx.popleft())
            arrived = True
        if arrived:
            self.int_level |= INT_RX  # QEMU's read trigger is one character
        self._update()

    @property
    def flags(self) -> int:
        """UARTFR: the FIFOs' state; the transmitter is always empty, never busy."""
        flags = PL011_FLAG_TXFE
        if not self.fifo:
            flags |= PL011_FLAG_RXFE
        if len(self.fifo) >= self._fifo_depth():
            flags |= PL011_FLAG_RXFF
        return flags

    # --- the guest's side -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset)

    def _read(self, offset: int) -> int:
        if offset == UARTDR:
            if not self.fifo:
                return 0
            value = self.fifo.popleft()
            if not self.fifo:
                self.int_level &= ~INT_RX
            self._received()  # room again: the next typed byte moves in
            return value
        if UARTPERIPHID0 <= offset < UARTPERIPHID0 + 4 * len(PL011_ID_ARM) and offset % 4 == 0:
            return PL011_ID_ARM[(offset - UARTPERIPHID0) // 4]
        return {
            UARTRSR: self.rsr,
            UARTFR: self.flags,
            UARTILPR: self.ilpr,
            UARTIBRD: self.ibrd,
            UARTFBRD: self.fbrd,
            UARTLCR_H: self.lcr,
            UARTCR: self.cr,
            UARTIFLS: self.ifls,
            UARTIMSC: self.int_enabled,
            UARTRIS: self.int_level,
            UARTMIS: self.int_level & self.int_enabled,
            UARTDMACR: self.dmacr,
        }.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFFFF)

    def _write(self, offset: int, value: int) -> None:
        if offset == UARTDR:
            self._transmit(value & 0xFF)
        elif offset == UARTRSR:
            self.rsr = 0  # any write clears the error flags
        elif offset == UARTILPR:
            self.ilpr = value & 0xFF
        elif offset == UARTIBRD:
            self.ibrd = value
        elif offset == UARTFBRD:
            self.fbrd = value & 0x3F
        elif offset == UARTLCR_H:
            if (self.lcr ^ value) & LCR_FEN:  # switching the FIFOs on or off empties them
                self.fifo.clear()
            self.lcr = value & 0xFF
            self._received()
        elif offset == UARTCR:
            self.cr = value
        elif offset == UARTIFLS:
            self.ifls = value & 0x3F
        elif offset == UARTIMSC:
            self.int_enabled = value & INT_ALL
            self._update()
        elif offset == UARTICR:
            self.int_level &= ~value
            self._update()
        elif offset == UARTDMACR:
            self.dmacr = value & 0x7
        # UARTFR, RIS, MIS and the ID registers are read-only

    def _transmit(self, byte: int) -> None:
        """Out at once (QEMU sends even with UARTEN or TXE clear); in loopback, back into the
        receive FIFO instead."""
        if self.cr & CR_LBE:
            self.rx.appendleft(byte)
            self._received()
        else:
            self._send(byte)
        self.int_level |= INT_TX
        self._update()

    def _update(self) -> None:
        self._set_irq(bool(self.int_level & self.int_enabled))
