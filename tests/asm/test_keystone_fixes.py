"""Keystone's known wrong encodings: kvmlab re-encodes them, refuses them or warns."""

from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_64, Cs

from kvmlab.asm import AsmError, assemble


def decode16(code: bytes, base: int) -> list[str]:
    return [
        f"{i.mnemonic} {i.op_str}".strip() for i in Cs(CS_ARCH_X86, CS_MODE_16).disasm(code, base)
    ]


def test_16_bit_call_and_ret_are_encoded_16_bit() -> None:
    program = assemble("call sub\nhlt\nsub: ret", base=0x7C00)
    assert program.code == bytes.fromhex("e80100 f4 c3")  # Keystone alone: 66 e8 01000000 f4 66 c3
    assert decode16(program.code, 0x7C00) == ["call 0x7c04", "hlt", "ret"]
    assert program.lines[0].note is not None and "66 e8 rel32" in program.lines[0].note
    assert program.warnings == []


def test_16_bit_call_to_an_address_and_backward_call_reach_their_targets() -> None:
    program = assemble("back: nop\ncall back\ncall 0x7c10", base=0x7C00)
    assert decode16(program.code, 0x7C00) == ["nop", "call 0x7c00", "call 0x7c10"]


def test_16_bit_ret_and_retf_with_and_without_a_count() -> None:
    program = assemble("ret\nret 4\nretf\nretf 2")
    assert program.code == bytes.fromhex("c3 c20400 cb ca0200")


def test_16_bit_push_immediate_pushes_two_bytes() -> None:
    program = assemble("push 3\npush -1\npush 0x1234\npush msg\nmsg: .byte 0", base=0x7C00)
    assert program.code == bytes.fromhex("6a03 6aff 683412 680a7c 00")
    assert decode16(program.code, 0x7C00)[:4] == ["push 3", "push -1", "push 0x1234", "push 0x7c0a"]


def test_16_bit_push_immediate_too_big_for_16_bits_is_an_error() -> None:
    with pytest.raises(AsmError) as caught:
        assemble("nop\npush 0x12345")
    assert (
        str(caught.value)
        == "line 2: push 0x12345 : immediate 0x12345 does not fit the 16 bits of a 16-bit push"
    )


def test_16_bit_fix_works_inside_rept_blocks() -> None:
    program = assemble(".rept 2\ncall sub\n.endr\nsub: ret")
    assert decode16(program.code, 0) == ["call 6", "call 6", "ret"]


def test_32_bit_code_keeps_keystones_encoding() -> None:
    program = assemble(".code32\ncall sub\nsub: ret\npush 0x1234")
    assert program.code == bytes.fromhex("e800000000 c3 6834120000")
    assert all(entry.note is None for entry in program.lines)


def test_16_bit_stack_instruction_left_32_bit_is_a_warning() -> None:
    program = assemble(".macro leave_fn\nret\n.endm\nnop\nleave_fn\npush word 0x1234")
    assert program.code == bytes.fromhex("90 66c3 666834120000")
    assert [(w.line, w.message.split(":")[0]) for w in program.warnings] == [
        (5, "Keystone emitted `ret` with a 66 prefix"),
        (6, "Keystone emitted `push 0x1234` with a 66 prefix"),
    ]


def test_intentional_32_bit_pushes_in_16_bit_code_are_not_warned_about() -> None:
    program = assemble("push eax\npop eax\npushfd\npush dword ptr [bx]")
    assert program.warnings == []


@pytest.mark.parametrize(
    ("line", "expected", "keystone_right"),
    [
        ("mov rbx, [0x3000]", "mov rbx, qword ptr [0x3000]", False),  # Keystone: [rip + 0x3000]
        ("mov rbx, fs:[0x28]", "mov rbx, qword ptr fs:[0x28]", False),  # Keystone: fs:[rip + 0x28]
        ("mov ebx, [0x3000]", "mov ebx, dword ptr [0x3000]", False),  # rip-relative, right here
        ("inc qword ptr [0x3000]", "inc qword ptr [0x3000]", False),
        ("mov qword ptr [0x3000], 5", "mov qword ptr [0x3000], 5", False),
        ("mov rcx, [ADDR + 8]", "mov rcx, qword ptr [0x4008]", True),
        ("lea rax, [-16]", "lea rax, [0xfffffffffffffff0]", True),
    ],
)
def test_64_bit_absolute_operand_is_encoded_absolute(
    line: str, expected: str, keystone_right: bool
) -> None:
    program = assemble(f".set ADDR, 0x4000\n{line}\nhlt", mode="64", base=0x1000)
    entry = program.lines[1]
    (insn,) = Cs(CS_ARCH_X86, CS_MODE_64).disasm(entry.data, entry.address)
    assert f"{insn.mnemonic} {insn.op_str}" == expected
    assert program.code == entry.data + b"\xf4"
    assert (entry.note is None) == keystone_right


def test_64_bit_absolute_fix_moves_the_code_after_it_and_its_labels() -> None:
    program = assemble("mov rbx, [0x3000]\njmp done\ndone: hlt", mode="64", base=0x1000)
    assert program.code == bytes.fromhex("488b1c2500300000 eb00 f4")
    assert program.labels == {"done": 0x100A}


def test_64_bit_label_and_rip_relative_operands_are_left_to_keystone() -> None:
    program = assemble(
        "mov rbx, [v]\nmov rbx, [rip + v]\nmov rax, [0x3000]\nv: .quad 0", mode="64", base=0x1000
    )
    decoded = [
        f"{i.mnemonic} {i.op_str}"
        for i in Cs(CS_ARCH_X86, CS_MODE_64).disasm(program.code[:25], 0x1000)
    ]
    assert decoded == [
        "mov rbx, qword ptr [0x1019]",
        "mov rbx, qword ptr [rip + 0xa]",
        "movabs rax, qword ptr [0x3000]",
    ]
    assert all(entry.note is None for entry in program.lines)


def test_64_bit_address_beyond_a_32_bit_displacement_is_an_error() -> None:
    with pytest.raises(AsmError) as caught:
        assemble("nop\nmov rbx, [0x90000000]", mode="64")
    assert caught.value.line == 2
    assert caught.value.message == (
        "address 0x90000000 does not fit this 64-bit displacement (Keystone encoded"
        " 0xffffffff90000000): put it in a register (`mov rax, 0x90000000`, then `[rax]`)"
    )


def test_address_beyond_a_16_bit_displacement_is_an_error() -> None:
    with pytest.raises(AsmError) as caught:
        assemble("mov ax, [0x12345]")
    assert (
        caught.value.message
        == "address 0x12345 does not fit this 16-bit displacement (Keystone encoded 0x2345)"
    )


def test_octal_looking_number_is_a_warning() -> None:
    program = assemble('mov al, 010\n.ascii "010"')
    assert program.code[:2] == bytes.fromhex("b008")
    assert [str(w) for w in program.warnings] == [
        "line 1: `010` is octal in Keystone (= 8): for decimal drop the 0"
    ]
