; Talk to a device through memory: the VMM puts a scratch register file at 0xd0000000, an
; address no memory slot covers, so every load and store there is a KVM_EXIT_MMIO. A store
; exits once; a load exits and KVM completes it with the data the VMM put in kvm_run on the
; next KVM_RUN; a read-modify-write (`add [mem], imm`) exits twice, read then write.
.code32
    mov ebx, 0xd0000000
    mov dword ptr [ebx], 0x6b766d21      ; store: one MMIO write exit
    mov eax, dword ptr [ebx]             ; load: one MMIO read exit, completed on re-entry
    add dword ptr [ebx + 4], 5           ; read-modify-write: a read exit, then a write exit
    add dword ptr [ebx + 4], 5
    cmp eax, 0x6b766d21
    jne bad
    cmp dword ptr [ebx + 4], 10
    jne bad
    mov esi, ok_msg
    mov ecx, ok_end - ok_msg
    jmp print
bad:
    mov esi, bad_msg
    mov ecx, bad_end - bad_msg
print:
    mov dx, 0x3f8
    rep outsb
    hlt
ok_msg:
    .ascii "MMIO device answered\n"
ok_end:
bad_msg:
    .ascii "MMIO device gave wrong data\n"
bad_end:
