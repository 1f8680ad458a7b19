"""Checks of Keystone's output, line by line, by reading it back with Capstone.

Keystone sometimes returns wrong bytes without an error. What kvmlab can repair it repairs
(64-bit absolute operands come back as `fixes`); what would run differently from the source is
an AsmError; what only might is an AsmWarning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import capstone
from capstone import x86_const

from kvmlab.asm.disasm import capstone_for
from kvmlab.asm.expr import OCTAL, evaluate, names
from kvmlab.asm.program import AsmError, AsmWarning
from kvmlab.asm.source import PREFIXES, QUOTED, Line, Source, is_immediate

DATA_BITS = {".byte": 8, ".word": 16, ".short": 16, ".2byte": 16, ".hword": 16, ".long": 32}
DATA_BITS |= {".int": 32, ".4byte": 32, ".quad": 64, ".8byte": 64}
_SIZE_WITHOUT_PTR = re.compile(
    r"\b(byte|word|dword|qword|tbyte|fword|oword|xmmword|ymmword|zmmword)\s*\[", re.IGNORECASE
)
_STACK = frozenset(
    ["push", "pop", "call", "ret", "retf", "iret", "pushf", "popf", "enter", "leave", "lcall"]
)
_WIDE = re.compile(r"\b(e[a-d]x|e[sd]i|e[sb]p|dword)\b")
_REL8_ONLY = frozenset(["loop", "loope", "loopz", "loopne", "loopnz", "jcxz", "jecxz", "jrcxz"])


@dataclass
class Findings:
    """What the checks found: warnings, and lines kvmlab re-encodes as (bytes, why)."""

    warnings: list[AsmWarning] = field(default_factory=list)
    fixes: dict[int, tuple[bytes, str]] = field(default_factory=dict)


def silent_message(line: Line) -> str:
    """Why Keystone returned no bytes for `line` without saying so, in the student's terms."""
    sized = _SIZE_WITHOUT_PTR.search(line.body)
    if sized:
        size = sized.group(1)
        return (
            f"write `{size} ptr [...]`: in Intel syntax a size needs `ptr`, and Keystone"
            f" silently drops `{size} [...]`"
        )
    if line.word in DATA_BITS:
        bits = DATA_BITS[line.word]
        for operand in line.operands:
            value = evaluate(operand, {})
            if value is not None and not -(1 << (bits - 1)) <= value < 1 << bits:
                return (
                    f"{operand} does not fit `{line.word}` ({bits} bits): Keystone dropped the line"
                )
        return f"a value does not fit `{line.word}` ({bits} bits): Keystone dropped the line"
    return "Keystone silently produced no bytes for this line"


def check(
    source: Source, placed: Mapping[int, tuple[int, bytes]], values: Mapping[str, int]
) -> Findings:
    """Check every top-level line's bytes (`placed`: line number -> address, bytes) against its
    source, with `values` holding the labels' and symbols' values."""
    findings = Findings()
    for line in source.lines:
        if not line.top or not line.body:
            continue
        address, data = placed[line.number]
        octal = OCTAL.search(QUOTED.sub("", line.body))
        if octal:
            value = int(octal.group(), 8)
            message = f"`{octal.group()}` is octal in Keystone (= {value}): for decimal drop the 0"
            findings.warnings.append(AsmWarning(line.number, message))
        if line.word in DATA_BITS and len(data) != len(line.operands) * DATA_BITS[line.word] // 8:
            raise AsmError(line.number, line.text, silent_message(line))
        if not line.is_instruction:
            continue
        if not data and line.word not in source.macros:
            raise AsmError(line.number, line.text, silent_message(line))
        if source.arch == "arm64":
            _check_arm64(line, address, data, findings)
        else:
            _check_x86(line, address, data, source, values, findings)
    return findings


def _check_arm64(line: Line, address: int, data: bytes, findings: Findings) -> None:
    decoded = list(capstone_for("arm64", "64").disasm_lite(data, address))
    if len(data) != 4 or len(decoded) != 1:
        message = "Capstone does not read these bytes back as one instruction"
        findings.warnings.append(AsmWarning(line.number, message))


def _check_x86(
    line: Line,
    address: int,
    data: bytes,
    source: Source,
    values: Mapping[str, int],
    findings: Findings,
) -> None:
    insns = list(capstone_for("x86", line.mode, detail=True).disasm(data, address))
    if line.word in source.macros:  # an expansion: its source lines are elsewhere
        for insn in insns:
            _lint16(line, insn, findings)
        return
    if line.word in PREFIXES:
        return
    if len(insns) != 1 or insns[0].size != len(data):
        readback = "; ".join(f"{i.mnemonic} {i.op_str}".strip() for i in insns) or "nothing"
        message = (
            f"Capstone reads these bytes back as `{readback}`: Keystone may have mis-encoded it"
        )
        findings.warnings.append(AsmWarning(line.number, message))
        return
    insn = insns[0]
    _check_immediates(line, insn, values)
    _check_branch(line, insn, values)
    _lint16(line, insn, findings)
    fix = _check_memory(line, insn, values)
    if fix is not None:
        findings.fixes[line.number] = fix


def _check_immediates(line: Line, insn: capstone.CsInsn, values: Mapping[str, int]) -> None:
    """Keystone keeps the low bits of an immediate too big for its operand (`mov al, 0x1234`)."""
    if insn.group(capstone.CS_GRP_BRANCH_RELATIVE) or len(line.operands) != len(insn.operands):
        return
    for text, op in zip(line.operands, insn.operands, strict=True):
        if op.type != x86_const.X86_OP_IMM or not is_immediate(text, "x86"):
            continue
        value = evaluate(text, values)
        bits = op.size * 8
        if value is not None and not -(1 << (bits - 1)) <= value < 1 << bits:
            kept = value & ((1 << bits) - 1)
            message = (
                f"immediate {text} does not fit in {bits} bits (Keystone would keep {kept:#x})"
            )
            raise AsmError(line.number, line.text, message)


def _check_branch(line: Line, insn: capstone.CsInsn, values: Mapping[str, int]) -> None:
    """Keystone wraps a `loop` or `jcxz` target that is out of reach instead of failing."""
    if not insn.group(capstone.CS_GRP_BRANCH_RELATIVE) or len(line.operands) != 1:
        return
    target = re.sub(r"\b(short|near)\b", "", line.operands[0], flags=re.IGNORECASE)
    expected = evaluate(target, values)
    actual = insn.operands[-1].imm
    mask = (1 << int(line.mode)) - 1
    if expected is None or not (actual - expected) & mask:
        return
    reach = " (it reaches -128..+127 bytes)" if line.word in _REL8_ONLY else ""
    message = (
        f"`{line.word}` cannot reach {target.strip()} ({expected:#x}) from here{reach};"
        f" Keystone encoded a jump to {actual & mask:#x}"
    )
    raise AsmError(line.number, line.text, message)


def _lint16(line: Line, insn: capstone.CsInsn, findings: Findings) -> None:
    """A 16-bit stack instruction that came out 32-bit (66 prefix) and kvmlab did not rewrite."""
    if line.mode != "16" or insn.mnemonic not in _STACK or insn.prefix[2] != 0x66:
        return
    if _WIDE.search(insn.op_str):  # `push eax`, `push dword ptr [bx]`: 32-bit on purpose
        return
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    message = (
        f"Keystone emitted `{text}` with a 66 prefix: in"
        " 16-bit code it moves 4 bytes on the stack, not 2; write the 16-bit encoding with `.byte`"
    )
    findings.warnings.append(AsmWarning(line.number, message))


def _check_memory(
    line: Line, insn: capstone.CsInsn, values: Mapping[str, int]
) -> tuple[bytes, str] | None:
    """An absolute operand (`[0x3000]`) must address what the line says.

    In 64-bit code Keystone makes it rip-relative, sometimes to the wrong address (`mov rbx,
    [0x3000]` reads [rip + 0x3000]); kvmlab re-encodes it absolute (ModRM rm=100, SIB 0x25) and
    returns the bytes. In any mode Keystone truncates an address too big for the displacement.
    """
    mem = next((op.mem for op in insn.operands if op.type == x86_const.X86_OP_MEM), None)
    bracket = re.search(r"\[([^\]]*)\]", line.body)
    if mem is None or bracket is None or "rip" in (name.lower() for name in names(line.body)):
        return None
    inside = re.sub(r"^\s*[a-z]s\s*:", "", bracket.group(1), flags=re.IGNORECASE).strip()
    value = evaluate(inside, values)
    rip_relative = mem.base == x86_const.X86_REG_RIP
    if value is None and rip_relative:
        message = (
            "Keystone encodes this address rip-relative and kvmlab cannot tell which address"
            " you meant: use a label, `[rip + label]` or a register base"
        )
        raise AsmError(line.number, line.text, message)
    if value is None:
        return None
    bits = {"16": 16, "32": 32, "64": 64}[line.mode]
    if insn.prefix[3] == 0x67:  # address-size override
        bits = 32 if bits != 32 else 16
    mask = (1 << bits) - 1
    encoded = (insn.address + insn.size + mem.disp if rip_relative else mem.disp) & mask
    if rip_relative and (-(1 << 31) <= value < 1 << 31 or mask - (1 << 31) < value <= mask):
        data, modrm = bytes(insn.bytes), insn.modrm_offset
        disp32 = (value & 0xFFFFFFFF).to_bytes(4, "little")
        sib = bytes([(data[modrm] & 0x38) | 0x04, 0x25]) + disp32
        note = (
            f"Keystone encodes `[{inside}]` as `[rip + {mem.disp:#x}]`"
            + (", a different address" if encoded != value & mask else "")
            + f"; kvmlab emits the absolute form (ModRM+SIB, no base, disp32 {value:#x})"
        )
        return data[:modrm] + sib + data[modrm + 5 :], note
    if encoded != value & mask or not -(1 << (bits - 1)) <= value <= mask:
        hint = f": put it in a register (`mov rax, {value:#x}`, then `[rax]`)" if bits == 64 else ""
        message = (
            f"address {value:#x} does not fit this {bits}-bit displacement"
            f" (Keystone encoded {encoded:#x}){hint}"
        )
        raise AsmError(line.number, line.text, message)
    return None
