"""The NASM habits kvmlab reads, rewritten into Keystone's GNU directives line by line.

Students arrive with NASM sources: `bits 32` (or `[bits 32]`), data as `db 'text', 10, 0`,
`dw`/`dd`/`dq`, reservations as `resb 16`, `times 4 db 0`, constants as `NAME equ 5`, and
labels without a colon before `db`/`equ`. Each becomes the directive Keystone knows (`.code32`,
`.byte`, `.word`, `.long`, `.quad`, `.fill`, `.set`), noted in its listing line. Strings
follow NASM: 'single' and "double" quotes are literal, `backquotes` take C escapes (\\n).
https://www.nasm.us/doc/nasmdoc3.html (pseudo-instructions)
"""

from __future__ import annotations

import re

from kvmlab.asm.program import AsmError

DATA = {"db": (".byte", 1), "dw": (".word", 2), "dd": (".long", 4), "dq": (".quad", 8)}
RESERVE = {"resb": 1, "resw": 2, "resd": 4, "resq": 8}
_BITS = re.compile(r"\[?\s*bits\s+(16|32|64)\s*\]?", re.IGNORECASE)
_USE = re.compile(r"use(16|32)", re.IGNORECASE)
_NAMED = re.compile(r"([A-Za-z_.$?][\w.$?#@~]*)\s+(\w+)\b\s*(.*)", re.DOTALL)
_STRING = re.compile(r"\"[^\"]*\"|'[^']*'|`(?:\\.|[^`\\])*`")


def from_nasm(number: int, text: str, body: str) -> tuple[list[str], str, str | None]:
    """The labels, the statement and a note for NASM's `body` (unchanged when it is not NASM)."""
    if match := _BITS.fullmatch(body) or _USE.fullmatch(body):
        bits = match.group(1)
        return [], f".code{bits}", f"NASM's `{body}` read as `.code{bits}`"
    labels: list[str] = []
    word, _, rest = body.partition(" ")
    named = _NAMED.fullmatch(body)
    if named and named.group(2).lower() in (*DATA, *RESERVE, "equ"):
        labels, word, rest = [named.group(1)], named.group(2), named.group(3)
    word = word.lower()
    rest = rest.strip()
    if word == "equ" and labels:
        return [], f".set {labels[0]}, {rest}", f"NASM's `equ` read as `.set {labels[0]}, ...`"
    if word in DATA:
        directive, size = DATA[word]
        return labels, f"{directive} {_data(number, text, rest, size)}", _note(word, directive)
    if word in RESERVE:
        fill = f".fill {rest}, {RESERVE[word]}, 0"
        return labels, fill, _note(word, ".fill")
    if word == "times":
        return labels, _times(number, text, rest), _note("times", ".fill")
    return [], body, None


def _times(number: int, text: str, rest: str) -> str:
    """`times COUNT db VALUE` (one value of db/dw/dd/dq) as `.fill COUNT, SIZE, VALUE`."""
    match = re.fullmatch(r"(.+?)\s+(db|dw|dd|dq)\s+([^,]+)", rest, re.IGNORECASE)
    if match is None:
        message = "kvmlab reads `times COUNT db VALUE` only: write `.rept COUNT` ... `.endr`"
        raise AsmError(number, text, message)
    count, word, value = match.groups()
    if "$" in count:
        message = "`$` in a `times` count is not supported (Keystone cannot size it): give a number"
        raise AsmError(number, text, message)
    return f".fill {count}, {DATA[word.lower()][1]}, {value.strip()}"


def _note(word: str, directive: str) -> str:
    return f"NASM's `{word}` read as `{directive}`"


def _data(number: int, text: str, operands: str, size: int) -> str:
    """`db`'s operands with each string spelled out as its byte values."""
    if not operands:
        raise AsmError(number, text, "missing operand")
    out: list[str] = []
    position = 0
    for match in _STRING.finditer(operands):
        out.append(operands[position : match.start()])
        raw = match.group()
        data = _string_bytes(number, text, raw)
        if size != 1:
            message = f"a string in `{_word(size)}` is not supported: put text in `db`"
            raise AsmError(number, text, message)
        out.append(", ".join(str(b) for b in data) if data else "")
        position = match.end()
    out.append(operands[position:])
    items = [item.strip() for item in "".join(out).split(",")]
    return ", ".join(item for item in items if item)


_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, "e": 27}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")


def _string_bytes(number: int, text: str, raw: str) -> bytes:
    """A NASM string's bytes: quotes are literal, backquotes take C-style escapes."""
    quote, inner = raw[0], raw[1:-1]
    if quote != "`":
        return inner.encode("latin-1", "replace")
    out = bytearray()
    position = 0
    for match in _ESCAPE.finditer(inner):
        out += inner[position : match.start()].encode("latin-1", "replace")
        code = match.group(1)
        if code[0] == "x":
            out.append(int(code[1:], 16))
        elif code[0] in "01234567":
            out.append(int(code, 8) & 0xFF)
        elif code in _ESCAPES:
            out.append(_ESCAPES[code])
        elif code in "'\"`\\?":
            out += code.encode()
        else:
            raise AsmError(number, text, f"unknown escape `\\{code}` in a backquoted string")
        position = match.end()
    return bytes(out + inner[position:].encode("latin-1", "replace"))


def _word(size: int) -> str:
    return next(word for word, (_, s) in DATA.items() if s == size)
