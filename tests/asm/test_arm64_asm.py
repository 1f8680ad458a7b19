"""arm64: the same assembler, listing and errors with Keystone's AArch64 back end."""

from __future__ import annotations

import pytest

from kvmlab.asm import AsmError, assemble, disassemble

PSCI_OFF = """\
    mov x0, #1          // # is an immediate here, not a comment
    ldr x1, =0x84000008 ; PSCI SYSTEM_OFF, from the literal pool
    hvc #0
spin: b spin
"""


def test_arm64_assembles_mov_ldr_hvc_and_branches() -> None:
    program = assemble(PSCI_OFF, arch="arm64", base=0x1000)
    assert (program.mode, program.arch, program.labels) == ("64", "arm64", {"spin": 0x100C})
    listing = [(entry.address, entry.data.hex()) for entry in program.lines]
    assert listing == [
        (0x1000, "200080d2"),
        (0x1004, "61000058"),
        (0x1008, "020000d4"),
        (0x100C, "00000014"),
    ]
    insns = disassemble(program.code, arch="arm64", base=0x1000)
    assert [f"{i.mnemonic} {i.op_str}" for i in insns[:4]] == [
        "mov x0, #1",
        "ldr x1, #0x1010",
        "hvc #0",
        "b #0x100c",
    ]


def test_arm64_literal_pool_is_in_the_code_but_in_no_line() -> None:
    program = assemble(PSCI_OFF, arch="arm64", base=0x1000)
    assert program.code[0x10:0x18] == (0x84000008).to_bytes(8, "little")
    assert program.line_at(0x1010) is None
    assert program.line_at(0x1008) == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("foo x0", "unknown mnemonic 'foo'"),
        ("mov x0, #0x123456789", "invalid operand"),
        ("mov x0, x99", "invalid operand"),
        ("b nowhere", "undefined symbol 'nowhere'"),
    ],
)
def test_arm64_errors_name_their_line(line: str, message: str) -> None:
    with pytest.raises(AsmError) as caught:
        assemble(f"mov x0, #1\n{line}\nhvc #0", arch="arm64")
    assert (caught.value.line, caught.value.message) == (2, message)
