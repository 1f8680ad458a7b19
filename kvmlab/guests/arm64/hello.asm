// Hello over the PL011 of QEMU's virt board, then PSCI SYSTEM_OFF. Each character polls
// UARTFR until TXFF (transmit FIFO full) is clear, then stores it to UARTDR: two MMIO
// exits per character, a load completed on re-entry and a store. The MMU is off, so the
// UART's physical address is used as it is.
    ldr x1, =0x09000000      // PL011 base
    adr x2, msg
next:
    ldrb w4, [x2], #1
    cbz w4, done
wait_tx:
    ldr w5, [x1, #0x18]      // UARTFR
    tbnz w5, #5, wait_tx     // TXFF: no room yet
    strb w4, [x1]            // UARTDR
    b next
done:
    ldr x0, =0x84000008      // PSCI SYSTEM_OFF
    hvc #0
msg:
    .asciz "Hello from arm64!\n"
