; Two vCPUs, one program, shared memory. Both start here; `lock xadd` hands out tickets, so
; exactly one becomes "first". The first raises `ping` and spins until `pong`; the second
; waits for `ping`, prints, and raises `pong`. Each vCPU is a thread of the VMM, and the
; flags live in guest RAM that both threads' KVM_RUN see.
.code16
    mov ax, 1
    lock xadd word ptr [ticket], ax
    test ax, ax
    jnz second
    mov byte ptr [ping], 1
wait_pong:
    pause
    cmp byte ptr [pong], 1
    jne wait_pong
    mov si, first_msg
    mov cx, first_end - first_msg
    jmp print
second:
    pause
    cmp byte ptr [ping], 1
    jne second
    mov si, second_msg
    mov cx, second_end - second_msg
    mov dx, 0x3f8
    rep outsb
    mov byte ptr [pong], 1
    hlt
print:
    mov dx, 0x3f8
    rep outsb
    hlt
ticket:
    .word 0
ping:
    .byte 0
pong:
    .byte 0
second_msg:
    .ascii "second vCPU: ping seen, pong sent\n"
second_end:
first_msg:
    .ascii "first vCPU: pong seen, handshake done\n"
first_end:
