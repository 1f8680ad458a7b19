; Hello over COM1 in real mode: poll the line status register (LSR, port 0x3fd) until the
; transmit holding register is empty (bit 5), then write the byte to THR (port 0x3f8).
; Every IN and OUT is a KVM_EXIT_IO that the VMM's 16550 model answers.
.code16
    mov si, msg
next:
    lodsb
    test al, al
    jz done
    mov bl, al
    mov dx, 0x3fd
wait_thre:
    in al, dx
    test al, 0x20
    jz wait_thre
    mov al, bl
    mov dx, 0x3f8
    out dx, al
    jmp next
done:
    hlt
msg:
    .asciz "Hello from real mode!\n"
