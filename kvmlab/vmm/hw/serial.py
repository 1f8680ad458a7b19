"""A 16550A UART (the PC's COM1 at 0x3f8, IRQ 4), after QEMU's hw/char/serial.c.

Transmission is instant (THRE and TEMT are set again as soon as THR is written); the bytes go
to `output` and to the `on_output` callback. `feed(b"...")` queues input for the guest (RBR,
LSR.DR). The interrupt line follows IIR and is reported through `on_irq(level)`.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/char/serial.c
"""

from __future__ import annotations

from kvmlab.vmm.hw.uart import Uart

# register offsets from the base port
UART_RX = UART_TX = UART_DLL = 0  # RBR (read) / THR (write); DLL when LCR.DLAB
UART_IER = UART_DLM = 1
UART_IIR = UART_FCR = 2  # IIR (read) / FCR (write)
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_LCR_DLAB = 0x80
UART_IER_RDI = 0x01  # interrupt on received data
UART_IER_THRI = 0x02  # interrupt when THR is empty
UART_IER_RLSI = 0x04  # interrupt on line status (errors; never raised here)
UART_IER_MSI = 0x08  # interrupt on modem status changes (never raised here)
UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO = 0xC0  # FIFOs enabled
UART_FCR_FE = 0x01  # FIFO enable
UART_FCR_RFR = 0x02  # clear the receive FIFO
UART_LSR_DR = 0x01  # data ready
UART_LSR_THRE = 0x20  # transmit holding register empty
UART_LSR_TEMT = 0x40  # transmitter empty
UART_MCR_LOOP = 0x10
UART_MSR_CTS, UART_MSR_DSR, UART_MSR_RI, UART_MSR_DCD = 0x10, 0x20, 0x40, 0x80


class Serial16550(Uart):
    """The UART's registers; `feed` types into it, `output`/`on_output` show what it sent."""

    name = "serial"

    def reset(self) -> None:
        """Power-on state: no interrupts enabled, transmitter empty, 9600 baud; input dropped."""
        with self._lock:
            self.divider = 0x0C
            self.ier = 0
            self.iir = UART_IIR_NO_INT
            self.fcr = 0
            self.lcr = 0
            self.mcr = 0
            self.lsr = UART_LSR_TEMT | UART_LSR_THRE
            self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
            self.scr = 0
            self.rbr = 0
            self.thr_ipending = False
            self.rx.clear()
            self._update_irq()

    def _received(self) -> None:
        """Typed input is read from RBR: data ready."""
        if self.rx:
            self.lsr |= UART_LSR_DR
        self._update_irq()

    # --- the guest's side -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._read(offset & 7)

    def _read(self, reg: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_RX:
            if dlab:
                return self.divider & 0xFF
            if self.rx:
                self.rbr = self.rx.popleft()
            if not self.rx:
                self.lsr &= ~UART_LSR_DR
            self._update_irq()
            return self.rbr
        if reg == UART_IER:
            return self.divider >> 8 if dlab else self.ier
        if reg == UART_IIR:
            value = self.iir
            if value & 0x0F == UART_IIR_THRI:  # reading IIR acknowledges the THR interrupt
                self.thr_ipending = False
                self._update_irq()
            return value
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            return self.lsr
        if reg == UART_MSR:
            if self.mcr & UART_MCR_LOOP:  # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                m = self.mcr
                return (m & 1) << 5 | (m & 2) << 3 | (m & 4) << 4 | (m & 8) << 4
            return self.msr
        return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset & 7, value & 0xFF)

    def _write(self, reg: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if reg == UART_TX:
            if dlab:
                self.divider = (self.divider & 0xFF00) | value
                return
            self._transmit(value)
        elif reg == UART_IER:
            if dlab:
                self.divider = (self.divider & 0x00FF) | value << 8
                return
            changed = (self.ier ^ value) & 0x0F
            self.ier = value & 0x0F
            if changed & UART_IER_THRI:  # enabling THRI with THR empty raises it at once
                self.thr_ipending = bool(self.ier & UART_IER_THRI and self.lsr & UART_LSR_THRE)
            self._update_irq()
        elif reg == UART_FCR:
            self.fcr = value & 0xC9
            if value & UART_FCR_RFR:
                self.rx.clear()
                self.lsr &= ~UART_LSR_DR
            self.iir = (self.iir & 0x0F) | (UART_IIR_FIFO if self.fcr & UART_FCR_FE else 0)
            self._update_irq()
        elif reg == UART_LCR:
            self.lcr = value
        elif reg == UART_MCR:
            self.mcr = value & 0x1F
        elif reg == UART_SCR:
            self.scr = value
        # LSR and MSR are read-only

    def _transmit(self, byte: int) -> None:
        if self.mcr & UART_MCR_LOOP:  # loopback: what is sent is received
            self.rx.append(byte)
            self.lsr |= UART_LSR_DR
        else:
            self._send(byte)
        self.lsr |= UART_LSR_THRE | UART_LSR_TEMT
        self.thr_ipending = True
        self._update_irq()

    def _update_irq(self) -> None:
        """IIR shows the highest-priority pending cause; the line is up while there is one."""
        if self.ier & UART_IER_RDI and self.lsr & UART_LSR_DR:
            cause = UART_IIR_RDI
        elif self.ier & UART_IER_THRI and self.thr_ipending:
            cause = UART_IIR_THRI
        else:
            cause = UART_IIR_NO_INT
        self.iir = cause | (self.iir & 0xF0)
        self._set_irq(cause != UART_IIR_NO_INT)
