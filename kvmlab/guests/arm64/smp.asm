// Two vCPUs on QEMU's virt. vCPU 1 starts powered off; vCPU 0 starts it with PSCI CPU_ON
// (target MPIDR 1, entry point `second`, and a context id, the address of the flags, which
// vCPU 1 finds in x0). They hand-shake over shared RAM: vCPU 0 raises `ping`; vCPU 1 sees
// it, prints, raises `pong` and turns itself off (CPU_OFF); vCPU 0 sees `pong`, prints and
// powers the machine off. Each vCPU is a thread of the VMM, sitting in its own KVM_RUN.
    ldr x0, =0xC4000003      // PSCI CPU_ON, SMC64 calling convention
    mov x1, #1               // target: the vCPU whose MPIDR affinity is 1
    adr x2, second           // where it starts
    adr x3, flags            // its x0 there
    hvc #0
    cbnz x0, failed          // PSCI_RET_SUCCESS is 0
    adr x8, flags
    mov w9, #1
    strb w9, [x8]            // ping
wait_pong:
    ldrb w9, [x8, #1]
    cbz w9, wait_pong
    ldr x1, =0x09000000
    adr x2, first_msg
    bl puts
    ldr x0, =0x84000008      // PSCI SYSTEM_OFF
    hvc #0

second:
    mov x8, x0               // the context id: the flags
wait_ping:
    ldrb w9, [x8]
    cbz w9, wait_ping
    ldr x1, =0x09000000
    adr x2, second_msg
    bl puts
    mov w9, #1
    strb w9, [x8, #1]        // pong
    ldr x0, =0x84000002      // PSCI CPU_OFF: this vCPU sleeps in KVM_RUN from now on
    hvc #0

failed:
    ldr x1, =0x09000000
    adr x2, failed_msg
    bl puts
    ldr x0, =0x84000008
    hvc #0

puts:                        // the string at x2 to the PL011 at x1
    ldrb w4, [x2], #1
    cbz w4, puts_done
puts_wait:
    ldr w5, [x1, #0x18]      // UARTFR
    tbnz w5, #5, puts_wait   // TXFF
    strb w4, [x1]            // UARTDR
    b puts
puts_done:
    ret

flags:
    .byte 0, 0               // ping, pong
second_msg:
    .asciz "second vCPU: ping seen, pong sent\n"
first_msg:
    .asciz "first vCPU: pong seen, handshake done\n"
failed_msg:
    .asciz "CPU_ON failed\n"
