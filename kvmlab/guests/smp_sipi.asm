; Start the application processors as firmware does: the bootstrap processor (BSP) sends each
; one an INIT and a startup IPI (SIPI) through its local APIC's interrupt command register
; (ICR, 0xfee00300, destination in 0xfee00310), and the AP wakes in real mode at the page the
; SIPI's vector names: vector 0x01 is 0100:0000, the first byte of this program. This needs
; the in-kernel irqchip: only then does each vCPU have a local APIC (KVM_CREATE_IRQCHIP), and
; the APs wait for INIT and SIPI (mp_state UNINITIALIZED) instead of running at once. The BSP
; asks fw_cfg how many vCPUs there are, as SeaBIOS does; each AP checks in, one at a time
; under a spinlock, with a line on COM1 and a shared counter the BSP waits on. Real mode
; cannot address 0xfee00000, so the BSP first loads FS with a 4 GiB limit ("unreal mode").
; KVM delivers IPIs at once, so the 10 ms and 200 us waits of Intel's MP start-up sequence
; (and its second SIPI) are left out. Up to 9 vCPUs: counts are printed as one digit.
.code16
entry:                                  ; the BSP starts at 0000:1000, an AP at 0100:0000:
    .byte 0xea                          ; ljmp 0:start, the same byte; one CS for the labels
    .word start, 0                      ; below (spelled out: GNU as reads `ljmp 0:start` as
                                        ; an indirect jump through memory)
start:
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ecx, 0x1b                       ; IA32_APIC_BASE: bit 8 is set on the BSP only
    rdmsr
    test ah, 1
    jz ap
    cli
    mov dx, 0x510                       ; fw_cfg selector: FW_CFG_NB_CPUS
    mov ax, 0x05
    out dx, ax
    inc dx                              ; fw_cfg data: the count's low byte
    in al, dx
    mov [cpus], al
    add al, '0'
    mov [bsp_n], al
    mov si, bsp_msg
    mov cx, bsp_end - bsp_msg
    mov dx, 0x3f8
    rep outsb
    lgdt [gdt_desc]                     ; unreal mode: protected mode just long enough to
    mov eax, cr0                        ; load FS from a flat 4 GiB data descriptor
    or al, 1
    mov cr0, eax
    mov bx, 8
    mov fs, bx
    and al, 0xfe
    mov cr0, eax                        ; real mode again; FS keeps its 4 GiB limit
    mov ebx, 0xfee00000                 ; the local APIC's page (xAPIC)
    or dword ptr fs:[ebx + 0xf0], 0x100 ; spurious-vector register: APIC software-enabled
    mov cl, 1                           ; the APs' APIC IDs are 1 .. cpus - 1
next_ap:
    cmp cl, [cpus]
    jae wait_aps
    movzx eax, cl
    shl eax, 24
    mov dword ptr fs:[ebx + 0x310], eax ; ICR high: the destination's APIC ID
    mov dword ptr fs:[ebx + 0x300], 0x4500  ; ICR low: INIT, level assert; the write sends
init_sent:
    test dword ptr fs:[ebx + 0x300], 0x1000 ; delivery status: still being sent?
    jnz init_sent
    mov dword ptr fs:[ebx + 0x310], eax
    mov dword ptr fs:[ebx + 0x300], 0x4601  ; ICR low: SIPI, vector 0x01 (start at 0x1000)
sipi_sent:
    test dword ptr fs:[ebx + 0x300], 0x1000
    jnz sipi_sent
    inc cl
    jmp next_ap
wait_aps:
    mov al, [cpus]
    dec al
wait_count:
    pause
    cmp [checked_in], al
    jb wait_count
    add al, '0'
    mov [done_n], al
    mov si, done_msg
    mov cx, done_end - done_msg
    mov dx, 0x3f8
    rep outsb
    jmp halt
ap:                                     ; an AP, woken by its SIPI: IF is clear after INIT
    lock bts word ptr [print_lock], 0   ; take the spinlock
    jnc locked
    pause
    jmp ap
locked:
    mov al, [checked_in]
    add al, '1'
    mov [ap_n], al
    mov si, ap_msg
    mov cx, ap_end - ap_msg
    mov dx, 0x3f8
    rep outsb
    inc byte ptr [checked_in]           ; the counter the BSP waits on
    mov byte ptr [print_lock], 0        ; release the spinlock
halt:
    cli
    hlt
    jmp halt
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
gdt:
    .quad 0
    .quad 0x00cf92000000ffff            ; 8: data, base 0, limit 4 GiB, writable
gdt_end:
cpus:
    .byte 0
checked_in:
    .byte 0
print_lock:
    .word 0
bsp_msg:
    .ascii "BSP: "
bsp_n:
    .ascii "0 vCPUs; INIT and SIPI (vector 0x01) to each AP\n"
bsp_end:
ap_msg:
    .ascii "AP "
ap_n:
    .ascii "0: woke in real mode at 0100:0000\n"
ap_end:
done_msg:
    .ascii "BSP: "
done_n:
    .ascii "0 APs checked in\n"
done_end:
