"""Guest programs for the VMM tests: machine code as bytes, the assembly beside each line.

Each is position-dependent: it must be loaded at the address its name or docstring says.
"""

from __future__ import annotations

import struct

ENTRY = 0x1000
HELLO = b"Hello, serial!\n\0"


def hello_real(message: bytes = HELLO, entry: int = ENTRY) -> bytes:
    """Real mode: print a NUL-terminated message on COM1, one OUT per byte, then HLT."""
    return (
        bytes([0xBE]) + struct.pack("<H", entry + 0x0F)  # mov si, msg
        + bytes([0xBA, 0xF8, 0x03])  #                     mov dx, 0x3f8
        + bytes([0xAC])  #                                 l: lodsb
        + bytes([0x84, 0xC0])  #                           test al, al
        + bytes([0x74, 0x03])  #                           jz done
        + bytes([0xEE])  #                                 out dx, al
        + bytes([0xEB, 0xF8])  #                           jmp l
        + bytes([0xF4])  #                                 done: hlt
        + message  #                                       msg: db ...
    )  # fmt: skip


def hello_protected(message: bytes = HELLO, entry: int = ENTRY) -> bytes:
    """32-bit protected mode: the same loop with 32-bit registers (BE is mov esi, imm32)."""
    return (
        bytes([0xBE]) + struct.pack("<I", entry + 0x12)  # mov esi, msg
        + bytes([0x66, 0xBA, 0xF8, 0x03])  #               mov dx, 0x3f8
        + bytes([0xAC])  #                                 l: lodsb          ; al = [ds:esi++]
        + bytes([0x84, 0xC0])  #                           test al, al
        + bytes([0x74, 0x03])  #                           jz done
        + bytes([0xEE])  #                                 out dx, al
        + bytes([0xEB, 0xF8])  #                           jmp l
        + bytes([0xF4])  #                                 done: hlt
        + message  #                                       msg: db ...
    )  # fmt: skip


def hello_long(message: bytes = HELLO) -> bytes:
    """64-bit long mode: rip-relative addressing, which only exists in 64-bit code."""
    return (
        bytes([0x48, 0x8D, 0x35, 0x0D, 0, 0, 0])  # lea rsi, [rip + msg]   ; msg is 13 on
        + bytes([0x66, 0xBA, 0xF8, 0x03])  #        mov dx, 0x3f8
        + bytes([0xAC])  #                          l: lodsb
        + bytes([0x84, 0xC0])  #                    test al, al
        + bytes([0x74, 0x03])  #                    jz done
        + bytes([0xEE])  #                          out dx, al
        + bytes([0xEB, 0xF8])  #                    jmp l
        + bytes([0xF4])  #                          done: hlt
        + message  #                                msg: db ...
    )  # fmt: skip


# Real mode: echo COM1 input back to COM1 until a newline, polling LSR.DR, then HLT.
ECHO_REAL = bytes(
    [
        0xBA, 0xFD, 0x03,  # start: mov dx, 0x3fd      ; LSR
        0xEC,              # wait:  in al, dx
        0xA8, 0x01,        #        test al, 1         ; DR?
        0x74, 0xFB,        #        jz wait
        0xBA, 0xF8, 0x03,  #        mov dx, 0x3f8      ; RBR/THR
        0xEC,              #        in al, dx
        0xEE,              #        out dx, al
        0x3C, 0x0A,        #        cmp al, 10
        0x75, 0xEF,        #        jne start
        0xF4,              #        hlt
    ]
)  # fmt: skip

# Real mode: write 0x10 to isa-debug-exit (0x501); the HLT after it must never run.
DEBUG_EXIT_REAL = bytes(
    [
        0xBA, 0x01, 0x05,  # mov dx, 0x501
        0xB0, 0x10,        # mov al, 0x10
        0xEE,              # out dx, al
        0xF4,              # hlt
    ]
)  # fmt: skip

# Real mode at 0x1000: the port-IO exits one by one, for the exit log.
PORTS_REAL = bytes(
    [
        0xB0, 0x41,  # 0x1000 mov al, 'A'
        0xE6, 0xE9,  # 0x1002 out 0xe9, al      ; debug console
        0xE4, 0xE9,  # 0x1004 in al, 0xe9       ; reads back 0xe9
        0xE6, 0x80,  # 0x1006 out 0x80, al      ; no device: still an exit
        0xF4,        # 0x1008 hlt
    ]
)  # fmt: skip

LOOP = bytes([0xEB, 0xFE])  # jmp $   (any mode)

# Protected mode: a 32-bit MMIO read and write at 0xd0000000 (outside RAM), then HLT.
MMIO_BASE = 0xD0000000
MMIO_PROTECTED = (
    bytes([0xA1]) + struct.pack("<I", MMIO_BASE)  # mov eax, [0xd0000000]
    + bytes([0xA3]) + struct.pack("<I", MMIO_BASE + 4)  # mov [0xd0000004], eax
    + bytes([0xF4])  # hlt
)  # fmt: skip

# Protected mode: jump to 3 MiB, outside the 2 MiB of RAM: KVM cannot fetch the code there.
JUMP_OUTSIDE_RAM = (
    bytes([0xB8]) + struct.pack("<I", 0x300000)  # mov eax, 0x300000
    + bytes([0xFF, 0xE0])  # jmp eax
)  # fmt: skip

# Long mode, interrupt-driven COM1 input: the guest programs the master PIC (vectors 0x20-0x27,
# all lines masked but 4), so IRQ 4 arrives as vector 0x24; the handler ends with an EOI.
IRQ_IDTR, IRQ_IDT, IRQ_HANDLER, IRQ_VECTOR = 0x2F00, 0x3000, 0x1100, 0x24
IRQ_MAIN = (
    bytes([0x0F, 0x01, 0x1C, 0x25]) + struct.pack("<I", IRQ_IDTR)  # lidt [IRQ_IDTR]
    + bytes([0xB0, 0x11, 0xE6, 0x20])  # mov al, 0x11 ; out 0x20, al   ICW1: edge, cascade, ICW4
    + bytes([0xB0, 0x20, 0xE6, 0x21])  # mov al, 0x20 ; out 0x21, al   ICW2: vector base 0x20
    + bytes([0xB0, 0x04, 0xE6, 0x21])  # mov al, 0x04 ; out 0x21, al   ICW3: slave on line 2
    + bytes([0xB0, 0x01, 0xE6, 0x21])  # mov al, 0x01 ; out 0x21, al   ICW4: 8086 mode
    + bytes([0xB0, 0xEF, 0xE6, 0x21])  # mov al, 0xef ; out 0x21, al   OCW1: only IRQ 4 open
    + bytes([0x66, 0xBA, 0xF9, 0x03])  # mov dx, 0x3f9     ; IER
    + bytes([0xB0, 0x01])  #             mov al, 1         ; interrupt on received data
    + bytes([0xEE])  #                   out dx, al
    + bytes([0xFB])  #                   sti
    + bytes([0xF4])  #                   l: hlt
    + bytes([0xEB, 0xFD])  #             jmp l
)  # fmt: skip
IRQ_HANDLER_CODE = bytes(
    [
        0x66, 0xBA, 0xFD, 0x03,  # h:    mov dx, 0x3fd    ; LSR
        0xEC,                    #       in al, dx
        0xA8, 0x01,              #       test al, 1       ; DR?
        0x74, 0x09,              #       jz done
        0x66, 0xBA, 0xF8, 0x03,  #       mov dx, 0x3f8
        0xEC,                    #       in al, dx        ; RBR
        0xE6, 0xE9,              #       out 0xe9, al     ; echo on the debug console
        0xEB, 0xEE,              #       jmp h            ; drain the FIFO, as a driver does
        0xB0, 0x20, 0xE6, 0x20,  # done: mov al, 0x20 ; out 0x20, al  ; EOI
        0x48, 0xCF,              #       iretq
    ]
)  # fmt: skip
IRQ_IDTR_BYTES = struct.pack("<HQ", 256 * 16 - 1, IRQ_IDT)
# a 64-bit interrupt gate: offset 15:0, selector 0x08, IST 0, present ring-0 gate, offset 63:16
IRQ_GATE = struct.pack("<HHBBHII", IRQ_HANDLER & 0xFFFF, 0x08, 0, 0x8E, IRQ_HANDLER >> 16, 0, 0)
