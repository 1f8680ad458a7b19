; Echo what is typed on COM1 until a '.' arrives. Waiting for a byte polls LSR bit 0 (data
; ready); the VMM answers each IN from its receive FIFO, which a notebook or `feed()` fills.
.code16
again:
    mov dx, 0x3fd
wait_data:
    in al, dx
    test al, 1
    jz wait_data
    mov dx, 0x3f8
    in al, dx
    out dx, al
    cmp al, '.'
    jne again
    hlt
