"""The 16550 UART model, register by register."""

from __future__ import annotations

from kvmlab.vmm.hw.serial import (
    UART_IER,
    UART_IER_RDI,
    UART_IER_THRI,
    UART_IIR,
    UART_IIR_NO_INT,
    UART_IIR_RDI,
    UART_IIR_THRI,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MSR,
    UART_SCR,
    Serial16550,
)


def make() -> tuple[Serial16550, list[bytes], list[bool]]:
    out: list[bytes] = []
    irqs: list[bool] = []
    return Serial16550(on_output=out.append, on_irq=irqs.append), out, irqs


def test_writing_thr_transmits_the_byte_to_the_buffer_and_the_callback() -> None:
    uart, out, _ = make()
    for byte in b"hi\n":
        uart.write(0, 1, byte)
    assert uart.output == b"hi\n"
    assert out == [b"h", b"i", b"\n"]
    assert uart.text() == "hi\n"


def test_the_transmitter_is_always_ready() -> None:
    uart, _, _ = make()
    assert uart.read(UART_LSR, 1) & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT
    uart.write(0, 1, ord("x"))
    assert uart.read(UART_LSR, 1) & UART_LSR_THRE


def test_fed_bytes_are_read_from_rbr_in_order_with_lsr_dr_set_while_any_remain() -> None:
    uart, _, _ = make()
    assert not uart.read(UART_LSR, 1) & UART_LSR_DR
    uart.feed(b"ab")
    assert uart.read(UART_LSR, 1) & UART_LSR_DR
    assert uart.read(0, 1) == ord("a")
    assert uart.read(UART_LSR, 1) & UART_LSR_DR
    assert uart.read(0, 1) == ord("b")
    assert not uart.read(UART_LSR, 1) & UART_LSR_DR


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch() -> None:
    uart, _, _ = make()
    uart.write(UART_LCR, 1, UART_LCR_DLAB | 0x03)
    uart.write(0, 1, 0x01)  # DLL: 115200 baud
    uart.write(UART_IER, 1, 0x00)  # DLM
    assert (uart.read(0, 1), uart.read(UART_IER, 1)) == (0x01, 0x00)
    assert uart.divider == 1
    assert uart.output == b""  # not transmitted
    uart.write(UART_LCR, 1, 0x03)
    assert uart.read(UART_IER, 1) == 0  # IER again
    assert uart.read(UART_LCR, 1) == 0x03


def test_received_data_raises_the_interrupt_when_enabled_and_reading_lowers_it() -> None:
    uart, _, irqs = make()
    uart.feed(b"k")
    assert irqs == []  # IER is 0
    uart.write(UART_IER, 1, UART_IER_RDI)
    assert irqs == [True]
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_RDI
    uart.read(0, 1)
    assert irqs == [True, False]
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_NO_INT


def test_enabling_thri_with_thr_empty_interrupts_at_once_and_reading_iir_acknowledges() -> None:
    uart, _, irqs = make()
    uart.write(UART_IER, 1, UART_IER_THRI)
    assert irqs == [True]
    assert uart.read(UART_IIR, 1) & 0x0F == UART_IIR_THRI
    assert irqs == [True, False]
    uart.write(0, 1, ord("z"))  # THR empty again after sending
    assert irqs == [True, False, True]


def test_scratch_register_holds_a_byte() -> None:
    uart, _, _ = make()
    uart.write(UART_SCR, 1, 0x5A)
    assert uart.read(UART_SCR, 1) == 0x5A


def test_loopback_sends_transmitted_bytes_to_the_receiver() -> None:
    uart, out, _ = make()
    uart.write(UART_MCR, 1, 0x10 | 0x0F)
    uart.write(0, 1, 0x55)
    assert out == []
    assert uart.read(0, 1) == 0x55
    assert uart.read(UART_MSR, 1) == 0xF0  # DTR, RTS, OUT1, OUT2 -> DSR, CTS, RI, DCD


def test_modem_status_reports_a_connected_line() -> None:
    uart, _, _ = make()
    assert uart.read(UART_MSR, 1) == 0xB0  # DCD | DSR | CTS


def test_fcr_enables_fifos_in_iir_and_can_clear_the_input() -> None:
    uart, _, _ = make()
    uart.feed(b"junk")
    uart.write(2, 1, 0x01 | 0x02)
    assert uart.read(UART_IIR, 1) & 0xC0 == 0xC0
    assert not uart.read(UART_LSR, 1) & UART_LSR_DR


def test_reset_drops_input_but_keeps_what_was_already_printed() -> None:
    uart, _, _ = make()
    uart.write(0, 1, ord("a"))
    uart.feed(b"b")
    uart.write(UART_IER, 1, UART_IER_RDI)
    uart.reset()
    assert uart.output == b"a"
    assert not uart.read(UART_LSR, 1) & UART_LSR_DR
    assert uart.read(UART_IER, 1) == 0
