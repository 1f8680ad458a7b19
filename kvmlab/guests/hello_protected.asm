; Hello over COM1 in 32-bit protected mode (the VMM's loader built the GDT and set CS/DS).
.code32
    mov esi, msg
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
    .asciz "Hello from protected mode!\n"
