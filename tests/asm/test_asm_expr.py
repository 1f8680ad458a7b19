"""kvmlab's reading of numbers and expressions agrees with Keystone's, so its checks are right."""

from __future__ import annotations

import pytest

from kvmlab.asm import assemble
from kvmlab.asm.expr import evaluate

EXPRESSIONS = [
    "0x1f",
    "1fh",
    "0b101",
    "42",
    "010",  # octal, as Keystone reads it
    "'A'",
    "-5",
    "~0",
    "(1 << 12) | 0x3",
    "100 / 7",
    "100 % 7",
    "6 * 7 - 2",
    "0xff & ~0x0f",
    "(1 << 2) + 1",
    "(6 ^ 3) & 5",
    "ADDR + 8",
]


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_expression_value_agrees_with_keystone(text: str) -> None:
    keystone = assemble(f".set ADDR, 0x4000\n.long {text}", mode="32").code
    assert evaluate(text, {"ADDR": 0x4000}) & 0xFFFFFFFF == int.from_bytes(keystone, "little")


@pytest.mark.parametrize(
    "text", ["eax", "ebx + 4", "1b", "unknown", "", "(1", "1 +", "1 << 2 + 1", "6 ^ 3 & 5"]
)
def test_registers_unknown_names_broken_and_precedence_dependent_expressions_have_no_value(
    text: str,
) -> None:
    assert evaluate(text, {}) is None
