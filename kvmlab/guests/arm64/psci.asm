// PSCI through `hvc #0`: ask for the firmware's version, print it, power the machine off.
// KVM answers PSCI_VERSION itself (x0 = major << 16 | minor) and the guest goes on; for
// SYSTEM_OFF it needs the VMM, so KVM_RUN returns with KVM_EXIT_SYSTEM_EVENT (SHUTDOWN).
    ldr x0, =0x84000000      // PSCI_VERSION
    hvc #0
    lsr x6, x0, #16          // major
    and x7, x0, #0xffff      // minor
    ldr x1, =0x09000000      // PL011 base
    adr x2, version_msg
    bl puts
    add w4, w6, #0x30        // '0' + major
    bl putc
    mov w4, #0x2e            // '.'
    bl putc
    add w4, w7, #0x30
    bl putc
    adr x2, off_msg
    bl puts
    ldr x0, =0x84000008      // PSCI SYSTEM_OFF
    hvc #0
    adr x2, alive_msg        // reached only if the VMM runs this vCPU again
    bl puts
halt:
    wfi
    b halt

putc:                        // w4 to the UART at x1
    ldr w5, [x1, #0x18]      // UARTFR
    tbnz w5, #5, putc        // TXFF
    strb w4, [x1]            // UARTDR
    ret

puts:                        // the string at x2 to the UART at x1
    ldrb w4, [x2], #1
    cbz w4, puts_done
puts_wait:
    ldr w5, [x1, #0x18]
    tbnz w5, #5, puts_wait
    strb w4, [x1]
    b puts
puts_done:
    ret

version_msg:
    .asciz "PSCI "
off_msg:
    .asciz ", powering off\n"
alive_msg:
    .asciz "SYSTEM_OFF returned\n"
