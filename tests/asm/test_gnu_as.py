"""GNU `as` as a second opinion: Keystone's bytes, and kvmlab's repairs of them, checked."""

from __future__ import annotations

import pytest

from kvmlab.asm import AsmError, assemble, disassemble
from kvmlab.asm.gnu import assemble_gnu, gnu_as_missing
from kvmlab.guests import GUEST_BASE, SAMPLES

pytestmark = pytest.mark.skipif(gnu_as_missing() is not None, reason=str(gnu_as_missing()))
SAME_ENCODING = ("hello-real", "hello-protected", "hello-long", "echo", "mmio")


@pytest.mark.parametrize("name", SAME_ENCODING)
def test_both_assemblers_make_the_same_bytes_of_a_sample(name: str) -> None:
    guest = SAMPLES[name]
    assert assemble_gnu(guest.source, mode=guest.asm_mode, base=GUEST_BASE) == guest.code


@pytest.mark.parametrize("name", sorted(set(SAMPLES) - set(SAME_ENCODING)))
def test_where_encodings_differ_both_builds_behave_the_same(name: str) -> None:
    """GNU `as` picks shorter forms here (imm8 compares, short jumps): other bytes, same run."""
    guest = SAMPLES[name]
    gnu = assemble_gnu(guest.source, mode=guest.asm_mode, base=GUEST_BASE)
    assert gnu != guest.code
    outputs = []
    for code in (guest.code, gnu):
        with guest.machine() as m:
            m.load(code, GUEST_BASE)
            assert guest.run(m)
            outputs.append(m.serial.text())
    assert outputs[0] == outputs[1] != ""


@pytest.mark.parametrize(
    ("source", "base"),
    [
        ("call sub\nhlt\nsub: ret", 0x7C00),  # Keystone alone: a 32-bit call and ret
        ("back: nop\ncall back\ncall 0x7c10", 0x7C00),
        ("ret\nret 4\nretf\nretf 2", 0),
        ("push 3\npush -1\npush 0x1234\npush msg\nmsg: .byte 0", 0x7C00),
    ],
)
def test_kvmlabs_16_bit_repairs_of_keystone_match_gnu_as(source: str, base: int) -> None:
    assert assemble(source, base=base).code == assemble_gnu(source, base=base)


def test_64_bit_absolute_operands_stay_absolute_as_with_gnu_as() -> None:
    """Keystone alone makes `[0x3000]` rip-relative; kvmlab's moffs form and GNU as's SIB form
    are different bytes for the same absolute operand."""
    source = "mov rax, [0x3000]\nmov [0x3008], eax"
    ours = disassemble(assemble(source, mode="64").code, mode="64")
    theirs = disassemble(assemble_gnu(source, mode="64"), mode="64")
    assert [(i.mnemonic.replace("movabs", "mov"), i.op_str) for i in ours] == [
        (i.mnemonic, i.op_str) for i in theirs
    ]
    assert [i.op_str for i in theirs] == ["rax, qword ptr [0x3000]", "dword ptr [0x3008], eax"]


def test_a_gnu_as_error_is_pinned_to_its_source_line() -> None:
    with pytest.raises(AsmError) as caught:
        assemble_gnu("nop\nlabel:\n    frobnicate eax\nhlt")
    assert caught.value.line == 3
    assert "GNU as:" in caught.value.message and "frobnicate" in caught.value.message
