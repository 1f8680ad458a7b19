; Hello over COM1 in 64-bit long mode (the VMM's loader built the page tables), with one
; string instruction. KVM still exits once per byte: for `rep outsb` it emulates one
; element, exits with count 1, and resumes the instruction on the next KVM_RUN.
.code64
    lea rsi, [rip + msg]
    mov ecx, msg_end - msg
    mov dx, 0x3f8
    rep outsb
    hlt
msg:
    .ascii "Hello from long mode!\n"
msg_end:
