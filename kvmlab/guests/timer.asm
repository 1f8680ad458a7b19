; Count timer interrupts: program the 8259 PICs (IRQ 0 -> vector 0x20), the 8254 PIT
; (channel 0, rate generator, 100 Hz) and the real-mode interrupt vector table, then
; `sti; hlt` until ten ticks have come. Each tick prints '.', the tenth masks the line, and
; the handler ends with an EOI to the master PIC. Without an in-kernel irqchip every
; interrupt travels through the VMM: the PIT model raises IRQ 0, the PIC model asks for the
; vCPU, and kvm_arch_pre_run injects vector 0x20 with KVM_INTERRUPT, or requests an
; interrupt window if IF is clear.
.code16
    cli
    mov word ptr [0x20 * 4], tick        ; IVT[0x20] = 0000:tick
    mov word ptr [0x20 * 4 + 2], 0
    mov al, 0x11                         ; ICW1: edge-triggered, cascade, ICW4 follows
    out 0x20, al
    out 0xa0, al
    mov al, 0x20                         ; ICW2: master vectors 0x20-0x27
    out 0x21, al
    mov al, 0x28                         ;       slave vectors 0x28-0x2f
    out 0xa1, al
    mov al, 0x04                         ; ICW3: the slave is on line 2
    out 0x21, al
    mov al, 0x02                         ;       ... and knows it
    out 0xa1, al
    mov al, 0x01                         ; ICW4: 8086 mode
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe                         ; OCW1: only IRQ 0 unmasked
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    mov al, 0x34                         ; PIT: channel 0, lobyte/hibyte, mode 2
    out 0x43, al
    mov ax, 11932                        ; 1193182 Hz / 11932 = 100 Hz
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
wait_tick:
    hlt
    cmp word ptr [ticks], 10
    jb wait_tick
    cli
    mov si, done_msg
    mov dx, 0x3f8
    mov cx, done_end - done_msg
    rep outsb
    hlt
tick:
    push ax
    push dx
    inc word ptr [ticks]
    mov al, '.'
    out 0x80, al                          ; the POST port keeps the last code written
    mov dx, 0x3f8
    out dx, al
    cmp word ptr [ticks], 10
    jb eoi
    mov al, 0xff                          ; the tenth tick: mask IRQ 0, so no eleventh
    out 0x21, al                          ; comes between the main loop's check and its cli
eoi:
    mov al, 0x20                          ; EOI
    out 0x20, al
    pop dx
    pop ax
    iret
ticks:
    .word 0
done_msg:
    .ascii "\n10 ticks\n"
done_end:
