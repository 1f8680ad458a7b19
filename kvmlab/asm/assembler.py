"""`assemble`: source text to a Program, with every error on its line.

Keystone assembles a whole source and says neither where it failed nor where each line went.
kvmlab therefore hands it the source with a label before every top-level line and, after the
code, a `.quad` table of those labels (and of the `.set` symbols): the table comes back as the
last bytes, giving each line's address, and is cut off. On failure kvmlab assembles growing
prefixes of the source, each with the labels it does not reach yet defined at its end, and the
first prefix that fails names the line.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import struct
from collections.abc import Callable

from keystone import keystone_const as ks

from kvmlab.asm.checks import check, silent_message
from kvmlab.asm.disasm import check_target
from kvmlab.asm.program import AsmError, ListingLine, Program
from kvmlab.asm.source import KEYWORDS, ORIGIN, REGISTERS, Line, Source, parse
from kvmlab.asm.worker import CRASHED, TIMEOUT, WORKER, Outcome

_MARK = "__kvmlab_line_"
_TAIL = "__kvmlab_tail"  # after the last line, before an arm64 literal pool
_END = "__kvmlab_end"
_NASM = {
    "org": "pass base=ADDRESS to assemble()",
    "section": "kvmlab assembles one flat block of bytes, without sections",
    "global": "kvmlab has no linker: leave it out",
}


def assemble(
    source: str,
    *,
    mode: str | None = None,
    base: int = 0,
    arch: str = "x86",
    timeout: float = 5.0,
) -> Program:
    """Assemble `source` to be loaded at guest address `base`.

    `mode` is "16" (the default), "32" or "64" on x86 (`.code16/32/64` switch inside the
    source) and "64" on arm64. Each Keystone run must finish within `timeout` seconds. Raises
    AsmError, pinned to a line, for what cannot be assembled or would run differently from
    what the line says.

    >>> assemble("mov al, 'A'\\nout 0xe9, al  ; print it\\nhlt").code.hex()
    'b041e6e9f4'
    """
    mode = check_target(arch, mode)
    if base < 0:
        raise ValueError(f"base must not be negative, not {base:#x}")
    parsed = parse(source, arch=arch, mode=mode, base=base)
    while True:
        code, placed, values = _assemble_whole(parsed, timeout)
        findings = check(parsed, placed, values)
        if not findings.fixes:
            break
        for line in parsed.lines:  # each fix turns an instruction into `.byte`: this ends
            if line.number in findings.fixes:
                data, line.note = findings.fixes[line.number]
                line.emit = ".byte " + ", ".join(f"{b:#04x}" for b in data)
    listing, address = [], base
    for line in parsed.lines:
        data = b""
        if line.top:
            address, data = placed[line.number]
        listing.append(ListingLine(line.number, line.text, address, data, line.mode, line.note))
    labels = {name: value for name, value in values.items() if name in parsed.labels}
    return Program(code, base, mode, arch, labels, listing, findings.warnings)


def _assemble_whole(
    parsed: Source, timeout: float
) -> tuple[bytes, dict[int, tuple[int, bytes]], dict[str, int]]:
    """Assemble everything once: the code, each top-level line's (address, bytes), and the
    values of labels and symbols."""
    top = [line for line in parsed.lines if line.top]
    text = [f"{ORIGIN}:"]
    for line in parsed.lines:
        if line.top:
            text.append(f"{_MARK}{line.number}:")
        text.append(line.render())
    text.append(f"{_TAIL}:")
    if parsed.arch == "arm64":
        text.append(".ltorg")  # literal pools go before the table, not after it
    entries = [f"{_MARK}{line.number}" for line in top] + [_TAIL, _END] + parsed.symbols
    text += [f"{_END}:", ".quad " + ", ".join(entries)]
    (outcome,) = WORKER.run(
        parsed.arch, parsed.mode, parsed.base, ["\n".join(text)], timeout=timeout
    )
    out = outcome.code or b""
    size = 8 * len(entries)
    table = struct.unpack(f"<{len(entries)}Q", out[-size:]) if len(out) >= size else ()
    marks = [*table[: len(top) + 2]]  # each top-level line's address, the tail, the end
    end = parsed.base + len(out) - size
    if (
        not outcome.ok
        or not table
        or marks[-1] != end
        or marks != sorted(marks)
        or marks[0] < parsed.base
    ):
        raise _locate(parsed, outcome, timeout)
    offsets = [mark - parsed.base for mark in marks]
    placed: dict[int, tuple[int, bytes]] = {}
    values: dict[str, int] = {}
    for i, line in enumerate(top):
        placed[line.number] = (marks[i], out[offsets[i] : offsets[i + 1]])
        values.update(dict.fromkeys(line.labels, marks[i]))
    values |= dict(zip(parsed.symbols, table[len(top) + 2 :], strict=True))
    return out[: end - parsed.base], placed, values


def _locate(parsed: Source, whole: Outcome, timeout: float) -> AsmError:
    """Find the line that makes Keystone fail, hang or drop the source, and say why."""
    units = parsed.units()  # not empty: an empty source assembles
    run = functools.partial(WORKER.run, parsed.arch, parsed.mode, parsed.base, timeout=timeout)
    jobs = [_text(_flat(units[: k + 1]), parsed) for k in range(len(units))]
    outcomes = run(jobs, stop_on_error=True)
    failed = next((k for k, outcome in enumerate(outcomes) if not outcome.ok), None)
    if failed is None:
        line = units[-1][0]
        message = f"{_explain(whole, line, parsed)} (Keystone reported it for the whole source)"
        return AsmError(line.number, line.text, message)
    line, outcome = units[failed][0], outcomes[failed]
    if outcome.errno not in (TIMEOUT, CRASHED):
        if line.word == ".rept":
            line, outcome = _inside_rept(parsed, units, failed, run) or (line, outcome)
        elif outcome.code is None:
            line = _forward_branch(parsed, units, failed, run) or line
    return AsmError(line.number, line.text, _explain(outcome, line, parsed))


def _flat(units: list[list[Line]]) -> list[Line]:
    return [line for unit in units for line in unit]


def _text(lines: list[Line], parsed: Source) -> str:
    """`lines` as Keystone text, with the labels of the other lines defined at the end (so that
    forward references resolve) and a final byte (so that no bytes means a silent failure)."""
    known = {label for line in lines for label in line.labels}
    others = [label for label in parsed.labels if label not in known]
    return "\n".join(
        [
            f"{ORIGIN}:",
            *(line.render() for line in lines),
            *(f"{label}:" for label in others),
            ".byte 0",
        ]
    )


def _inside_rept(
    parsed: Source, units: list[list[Line]], failed: int, run: Callable[..., list[Outcome]]
) -> tuple[Line, Outcome] | None:
    """The instruction inside a failing `.rept` block that fails on its own."""
    before = _flat(units[:failed])
    inner = [line for line in units[failed][1:] if line.is_instruction]
    outcomes = run([_text([*before, line], parsed) for line in inner], stop_on_error=True)
    return next(((line, o) for line, o in zip(inner, outcomes, strict=False) if not o.ok), None)


def _forward_branch(
    parsed: Source, units: list[list[Line]], failed: int, run: Callable[..., list[Outcome]]
) -> Line | None:
    """The earlier short branch to blame when a range error shows up only once the code between
    it and its label has grown (`jmp short far_away`): without it the prefix assembles."""
    if _is_branch(units[failed][0], parsed):
        return None
    reached = {label for line in _flat(units[failed:]) for label in line.labels}
    suspects = [
        unit[0]
        for unit in units[:failed]
        if _is_branch(unit[0], parsed) and reached & set(_words(unit[0].body))
    ]
    prefix = _flat(units[: failed + 1])
    jobs = [
        _text(
            [dataclasses.replace(line, emit="") if line is suspect else line for line in prefix],
            parsed,
        )
        for suspect in suspects
    ]
    outcomes = run(jobs)
    return next((s for s, o in zip(suspects, outcomes, strict=False) if o.ok), None)


def _is_branch(line: Line, parsed: Source) -> bool:
    word = line.word
    if parsed.arch == "arm64":
        return word in ("b", "bl", "cbz", "cbnz", "tbz", "tbnz", "adr") or word.startswith("b.")
    return word.startswith(("j", "loop")) or word == "call"


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z_.$][\w.$]*", text)


def _explain(outcome: Outcome, line: Line, parsed: Source) -> str:
    """Keystone's failure on `line` in plain words, with a hint where one is known."""
    if outcome.errno == TIMEOUT:
        return f"{outcome.message}, so kvmlab stopped it (a huge `.rept` or `.fill`?)"
    if outcome.errno == CRASHED:
        return "Keystone crashed on this line (kvmlab restarted it)"
    if outcome.code is not None:
        return silent_message(line)
    plain = re.sub(r"\s*\(KS_ERR_\w+\)$", "", outcome.message)
    plain = plain[:1].lower() + plain[1:]
    if line.word in parsed.macros:  # the failing line is in the macro's body, used here
        return f"macro '{line.word}' does not assemble here: {plain}"
    words = line.body.split()
    nasm = next((word for word in words[:2] if word.lower() in _NASM), None)
    if nasm and outcome.errno in (ks.KS_ERR_ASM_MNEMONICFAIL, ks.KS_ERR_ASM_INVALIDOPERAND):
        return f"NASM's `{nasm}` is not supported: {_NASM[nasm.lower()]}"
    errno = outcome.errno
    if errno == ks.KS_ERR_ASM_MNEMONICFAIL:
        return f"unknown mnemonic '{words[0]}'"
    if errno == ks.KS_ERR_ASM_SYMBOL_MISSING:
        name = _undefined(line, parsed)
        return f"undefined symbol '{name}'" if name else "undefined symbol"
    if errno == ks.KS_ERR_ASM_SYMBOL_REDEFINED:
        return _redefined(line, parsed)
    if errno == ks.KS_ERR_ASM_DIRECTIVE_VALUE_RANGE:
        return f"a value is out of range for `{line.word}`"
    if errno == ks.KS_ERR_ASM_FRAGMENT_INVALID and line.word == ".org":
        return "`.org` cannot move backwards"
    if errno == ks.KS_ERR_ASM_FIXUP_INVALID:
        return "an address or distance does not fit this operand"
    if errno == ks.KS_ERR_ASM_EXPR_TOKEN:
        return "invalid expression"
    if errno >= ks.KS_ERR_ASM_INVALIDOPERAND:  # arm64 reports some as "Unknown error" (561)
        short = re.search(r"\bshort\b", line.body, re.IGNORECASE)
        return "invalid operand" + (" (a `short` jump reaches -128..+127 bytes)" if short else "")
    return plain


def _undefined(line: Line, parsed: Source) -> str | None:
    """The name on `line` that nothing defines."""
    defined = (
        parsed.labels | parsed.macros | {name for other in parsed.lines if (name := other.assigns)}
    )
    ignored = REGISTERS[parsed.arch] | KEYWORDS
    parts = line.body.split(None, 1)
    operands = parts[1] if len(parts) > 1 else ""
    return next(
        (name for name in _words(operands) if name not in defined and name.lower() not in ignored),
        None,
    )


def _redefined(line: Line, parsed: Source) -> str:
    """Which of `line`'s names was defined before, and where."""
    names = [*line.labels, *filter(None, [line.assigns])]
    for earlier in parsed.lines[: parsed.lines.index(line)]:
        for name in names:
            if name in earlier.labels or name == earlier.assigns:
                return f"'{name}' is already defined on line {earlier.number}"
    return "a symbol is defined twice"
