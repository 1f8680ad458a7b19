"""Assembling: bytes, labels, the listing, comments, directives and modes."""

from __future__ import annotations

import doctest

import pytest
from capstone import CS_ARCH_X86, CS_MODE_16, Cs

import kvmlab.asm.assembler
from kvmlab import cli
from kvmlab.asm import assemble, disassemble

HELLO = """\
; print the message on the serial port, one OUT per byte, then stop
        mov si, msg
        mov dx, 0x3f8
next:   lodsb
        test al, al
        jz done
        out dx, al
        jmp next
done:   hlt
msg:    .asciz "Hello from a kvmlab guest!\\n"
"""


def test_real_mode_hello_world_assembles_to_the_hand_assembled_demo_bytes() -> None:
    program = assemble(HELLO, base=cli.GUEST_BASE)
    assert program.code == cli.HELLO_16
    assert program.code[:3] == bytes([0xBE, 0x0F, 0x10])  # mov si, 0x100f: msg's address
    decoded = [
        (i.mnemonic, i.op_str) for i in Cs(CS_ARCH_X86, CS_MODE_16).disasm(program.code, 0x1000)
    ]
    assert decoded[:8] == [
        ("mov", "si, 0x100f"),
        ("mov", "dx, 0x3f8"),
        ("lodsb", "al, byte ptr [si]"),
        ("test", "al, al"),
        ("je", "0x100e"),
        ("out", "dx, al"),
        ("jmp", "0x1006"),
        ("hlt", ""),
    ]
    assert program.warnings == []


def test_labels_resolve_forward_and_backward() -> None:
    program = assemble("back: nop\njmp back\njmp fwd\nnop\nfwd: hlt", base=0x7C00)
    assert program.labels == {"back": 0x7C00, "fwd": 0x7C06}
    assert program.code == bytes.fromhex("90 ebfd eb01 90 f4")


def test_listing_has_one_entry_per_source_line_with_its_address_and_bytes() -> None:
    program = assemble(HELLO, base=0x1000)
    rows = [(entry.line, entry.address, entry.data.hex()) for entry in program.lines]
    assert rows[:4] == [
        (1, 0x1000, ""),
        (2, 0x1000, "be0f10"),
        (3, 0x1003, "baf803"),
        (4, 0x1006, "ac"),
    ]
    assert rows[-1] == (10, 0x100F, b"Hello from a kvmlab guest!\n\0".hex())
    assert [entry.text for entry in program.lines] == HELLO.splitlines()
    assert b"".join(entry.data for entry in program.lines) == program.code
    assert "   2  00001000  be 0f 10" in program.listing()


def test_line_at_maps_any_byte_of_an_instruction_to_its_source_line() -> None:
    program = assemble(HELLO, base=0x1000)
    assert program.line_at(0x1000) == 2
    assert program.line_at(0x1002) == 2  # the last byte of `mov si, msg`
    assert program.line_at(0x100E) == 9  # hlt
    assert program.line_at(0x0FFF) is None
    assert program.line_at(0x1000 + len(program.code)) is None


def test_semicolon_starts_a_comment_as_in_nasm_and_so_do_hash_and_slashes() -> None:
    source = "mov al, 1 ; NASM style\nmov bl, 2 # GNU style\nmov cl, 3 // C style\n; only a comment"
    program = assemble(source)
    assert program.code == bytes.fromhex("b001 b302 b103")
    assert [entry.data.hex() for entry in program.lines] == ["b001", "b302", "b103", ""]


def test_comment_characters_inside_strings_and_character_literals_are_data() -> None:
    program = assemble(".ascii \"a;b#c//d\" ; a comment\nmov al, ';'")
    assert program.code == b"a;b#c//d" + bytes([0xB0, ord(";")])


def test_data_directives_emit_their_bytes() -> None:
    source = """
    .byte 1, 0xff
    .word 0x1234
    .long 0x12345678
    .quad 1
    .ascii "ab"
    .asciz "c"
    .fill 3, 1, 0x90
    .align 4
    """
    code = assemble(source).code  # .align pads code with nop
    assert code.hex() == "01ff34127856341201000000000000006162630090909090"


def test_code16_code32_code64_switch_modes_inside_one_source() -> None:
    source = ".code16\njmp pm\n.code32\npm: mov eax, 1\n.code64\nmov rax, 1"
    program = assemble(source, base=0x1000)
    assert program.code == bytes.fromhex("eb00 b801000000 48c7c001000000")
    assert [entry.mode for entry in program.lines] == ["16", "16", "32", "32", "64", "64"]


def test_mode_and_base_set_the_starting_mode_and_the_label_addresses() -> None:
    program = assemble("mov eax, msg\nmsg: .byte 0", mode="32", base=0x200000)
    assert program.code == bytes.fromhex("b805002000 00")
    assert (program.mode, program.base, program.labels) == ("32", 0x200000, {"msg": 0x200005})


def test_set_symbols_and_rept_blocks_work_and_a_block_lists_on_its_first_line() -> None:
    program = assemble("COUNT = 3\n.set PORT, 0x80\n.rept COUNT\nout PORT, al\n.endr\nhlt")
    assert program.code == bytes.fromhex("e680" * 3 + "f4")
    assert [entry.data.hex() for entry in program.lines] == ["", "", "e680" * 3, "", "", "f4"]


def test_text_directive_is_accepted_and_ignored() -> None:
    program = assemble(".text\nnop")
    assert program.code == b"\x90"
    assert program.lines[0].note is not None


def test_disassemble_decodes_and_shows_undecodable_bytes_as_byte() -> None:
    insns = disassemble(bytes.fromhex("b041e6e9f4ff"), base=0x1000)
    assert [(i.address, i.mnemonic, i.op_str) for i in insns] == [
        (0x1000, "mov", "al, 0x41"),
        (0x1002, "out", "0xe9, al"),
        (0x1004, "hlt", ""),
        (0x1005, ".byte", "0xff"),
    ]
    assert str(insns[0]) == "0x1000: b0 41                    mov al, 0x41"


def test_disassemble_uses_the_mode_it_is_given() -> None:
    code = bytes.fromhex("b801000000")
    assert [i.op_str for i in disassemble(code, mode="32")] == ["eax, 1"]
    assert disassemble(code, mode="16")[0].op_str == "ax, 1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "8"}, "x86 mode must be one of"),
        ({"arch": "mips"}, "arch must be one of"),
        ({"arch": "arm64", "mode": "32"}, "arm64 has only mode '64'"),
        ({"base": -1}, "base must not be negative"),
    ],
)
def test_bad_mode_arch_or_base_is_a_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assemble("nop", **kwargs)  # type: ignore[arg-type]


def test_docstring_example_runs() -> None:
    assert doctest.testmod(kvmlab.asm.assembler).failed == 0


def test_nasm_data_bits_and_constants_are_read_as_the_gnu_directives_they_mean() -> None:
    source = """bits 16
start:
    mov si, msg
    hlt
msg db 'hi', 10, 0          ; a label without a colon, as NASM allows
esc: db `a\\n`, "\\n"       ; backquotes take escapes, double quotes do not
w dw 0x1234, start
d dd 7
q dq -1
buf resb 2
pad: times 3 db 0x90
K equ 5
    mov al, K
[bits 32]
    mov eax, 1
"""
    program = assemble(source, base=0x1000)
    expected = (
        bytes.fromhex("be0410 f4")
        + b"hi\n\0"
        + b"a\n\\n"
        + bytes.fromhex("3412 0010")
        + (7).to_bytes(4, "little")
        + b"\xff" * 8
        + bytes(2)
        + b"\x90" * 3
        + bytes.fromhex("b005 b801000000")
    )
    assert program.code == expected
    assert program.labels["msg"] == 0x1004 and program.labels["buf"] == 0x1004 + 4 + 4 + 4 + 4 + 8
    notes = {entry.line: entry.note for entry in program.lines if entry.note}
    assert notes[1] == "NASM's `bits 16` read as `.code16`"
    assert notes[5] == "NASM's `db` read as `.byte`"
    assert notes[12] == "NASM's `equ` read as `.set K, ...`"
    assert program.lines[-1].mode == "32"
