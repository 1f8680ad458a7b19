"""kvmlab assembly source, line by line: comments, labels, statements, blocks, the checks that must
happen before Keystone sees a line, and the rewrites that avoid Keystone's 16-bit bugs.

The dialect is Keystone's (GNU directives; Intel operands on x86) with one change: `;` starts a
comment, as in NASM, where Keystone would take it as a statement separator. So every statement
is on its own line and every error has a line. Comments are `;` and `//` everywhere, and `#` on
x86 (on arm64 `#` marks an immediate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvmlab.asm.expr import evaluate, names
from kvmlab.asm.nasm import from_nasm
from kvmlab.asm.program import AsmError

ORIGIN = "__kvmlab_origin"  # a label at `base`, defined in every source kvmlab gives Keystone


def _x86_registers() -> frozenset[str]:
    legacy = ["a", "b", "c", "d"]
    regs = {f"{r}{s}" for r in legacy for s in ("l", "h", "x")}
    for r in (*[f"{r}x" for r in legacy], "sp", "bp", "si", "di", "ip"):
        regs |= {r, f"e{r}", f"r{r}"}
    regs |= {"spl", "bpl", "sil", "dil", "cs", "ds", "es", "fs", "gs", "ss", "st"}
    for n in range(8, 16):
        regs |= {f"r{n}", f"r{n}b", f"r{n}w", f"r{n}d", f"r{n}l"}
    for n in range(16):
        regs |= {f"cr{n}", f"dr{n}"}
    for n in range(32):
        regs |= {f"xmm{n}", f"ymm{n}", f"zmm{n}"}
    regs |= {f"mm{n}" for n in range(8)} | {f"k{n}" for n in range(8)}
    return frozenset(regs)


def _arm64_registers() -> frozenset[str]:
    regs = {"sp", "wsp", "xzr", "wzr", "lr", "fp"}
    for n in range(32):
        regs |= {f"{kind}{n}" for kind in "xwvqdshb"}
    shifts = "lsl lsr asr ror msl uxtb uxth uxtw uxtx sxtb sxth sxtw sxtx"
    conditions = "eq ne cs hs cc lo mi pl vs vc hi ls ge lt gt le al nv"
    return frozenset(regs | set(shifts.split()) | set(conditions.split()))


REGISTERS = {"x86": _x86_registers(), "arm64": _arm64_registers()}
KEYWORDS = frozenset(
    ["ptr", "byte", "word", "dword", "qword", "tbyte", "fword", "oword", "xmmword", "ymmword",
     "zmmword", "offset", "short", "near", "far", "rel"]
)  # fmt: skip
PREFIXES = frozenset(
    ["rep", "repe", "repz", "repne", "repnz", "lock", "data16", "data32", "addr16", "addr32"]
)
UNSUPPORTED = {
    **dict.fromkeys(
        (".data", ".bss", ".section", ".rodata", ".pushsection", ".popsection", ".previous"),
        "kvmlab assembles one flat block of bytes, so there are no sections:"
        " put data after the code (for example after `hlt`)",
    ),
    ".include": "`.include` is not supported: paste the source in",
    ".incbin": "`.incbin` is not supported: write the bytes with `.byte`",
}
_LABEL = re.compile(r"\s*([A-Za-z_.$][\w.$]*|\d+)\s*:(?!:)")
_ASSIGN = re.compile(r"([A-Za-z_.$][\w.$]*)\s*=(?!=)")
_SET = re.compile(r"\.(?:set|equ|equiv)\s+([A-Za-z_.$][\w.$]*)\s*,", re.IGNORECASE)
_OPERATOR_END = tuple("+-*/%|&^~<>(:")
QUOTED = re.compile(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'")


@dataclass
class Line:
    """One source line: its labels and statement, and what Keystone will be given for it."""

    number: int
    text: str
    labels: list[str]
    body: str  # the statement, without labels and comments
    mode: str  # the x86 mode in force here (after `.code32`...); "64" on arm64
    top: bool  # outside any .rept/.macro/.if body, so it gets its own address
    in_macro: bool  # inside a .macro body, whose mode is only known where it is used
    emit: str = ""  # the statement as handed to Keystone (a rewrite may replace it)
    note: str | None = None  # why kvmlab rewrote it

    @property
    def word(self) -> str:
        """The mnemonic or directive, lowercased."""
        return self.body.split(None, 1)[0].lower() if self.body else ""

    @property
    def operands(self) -> list[str]:
        """The comma-separated operands after the first word."""
        parts = self.body.split(None, 1)
        return split_operands(parts[1]) if len(parts) > 1 else []

    @property
    def assigns(self) -> str | None:
        """The symbol a `.set NAME, value` or `NAME = value` line defines."""
        match = _SET.match(self.body) or _ASSIGN.match(self.body)
        return match.group(1) if match else None

    @property
    def is_instruction(self) -> bool:
        return bool(self.body) and not self.body.startswith(".") and self.assigns is None

    def render(self) -> str:
        """The line as Keystone sees it: its labels, then its (possibly rewritten) statement."""
        return "".join(f"{label}:\n" for label in self.labels) + self.emit


@dataclass
class Source:
    """A parsed source: its lines, the names it defines, and its arch, mode and base."""

    arch: str
    mode: str
    base: int
    lines: list[Line] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)
    macros: set[str] = field(default_factory=set)

    @property
    def symbols(self) -> list[str]:
        """Names given a value with `.set`/`.equ`/`=` at top level (kvmlab reads them back)."""
        return [name for line in self.lines if line.top and (name := line.assigns)]

    def units(self) -> list[list[Line]]:
        """The source cut where a prefix of it can be assembled: a top-level line, or a block
        (`.rept` ... `.endr`) as a whole."""
        units: list[list[Line]] = []
        for line in self.lines:
            if not line.top:
                units[-1].append(line)
            elif line.body or line.labels:
                units.append([line])
        return units


def parse(text: str, *, arch: str, mode: str, base: int) -> Source:
    """Read `text`, raising AsmError for a line Keystone must not see or would get wrong."""
    source = Source(arch, mode, base)
    blocks: list[Line] = []  # the open .rept/.macro/.if lines
    for number, raw in enumerate(text.splitlines(), 1):
        code = _strip_comment(number, raw, arch)
        labels = []
        while (match := _LABEL.match(code)) and match.group(1) not in REGISTERS[arch]:
            labels.append(match.group(1))
            code = code[match.end() :]
        in_macro = any(block.word == ".macro" for block in blocks)
        body, note = code.strip(), None
        if arch == "x86":
            named, body, note = from_nasm(number, raw, body)
            labels += named
        line = Line(number, raw, labels, body, mode, not blocks, in_macro, note=note)
        word = line.word
        if word in (".rept", ".irp", ".irpc", ".macro") or word.startswith(".if"):
            blocks.append(line)
            if word == ".macro" and len(line.body.split()) > 1:
                source.macros.add(line.body.split()[1].rstrip(","))
        elif word in (".endr", ".endm", ".endif") and blocks:
            blocks.pop()
        elif arch == "x86" and word in (".code16", ".code32", ".code64"):
            mode = line.mode = word[-2:]
        _check(line)
        line.emit = line.body
        source.labels.update(label for label in labels if not label.isdigit())
        source.lines.append(line)
    if blocks:
        opener = blocks[-1]
        end = {".macro": ".endm", ".rept": ".endr", ".irp": ".endr", ".irpc": ".endr"}
        closer = end.get(opener.word, ".endif")
        raise AsmError(opener.number, opener.text, f"`{opener.word}` has no matching `{closer}`")
    for line in source.lines:
        if line.word == ".text":
            line.emit = ""
            line.note = (
                "kvmlab ignores `.text`: there is one section anyway (Keystone crashes on it)"
            )
        elif arch == "x86" and line.mode == "16" and line.is_instruction and not line.in_macro:
            _rewrite16(line, source)
    return source


def split_operands(text: str) -> list[str]:
    """Split at the commas that are outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def is_immediate(operand: str, arch: str) -> bool:
    """True if `operand` is an expression (a number or label), not a register or memory."""
    unquoted = QUOTED.sub("0", operand)  # `push ']'` pushes a character
    if not operand or any(ch in unquoted for ch in "[]{}:"):
        return False
    words = {name.lower() for name in names(operand)}
    return not words & (REGISTERS[arch] | KEYWORDS)


def _strip_comment(number: int, text: str, arch: str) -> str:
    """`text` without its comment; an unterminated string is an error (it hangs Keystone)."""
    markers = (";", "//", "#") if arch == "x86" else (";", "//")
    quote, i = "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif text.startswith(markers, i):
            return text[:i]
        i += 1
    if quote:
        raise AsmError(number, text, "unterminated string: a closing " + quote + " is missing")
    return text


def _check(line: Line) -> None:
    """Refuse what Keystone hangs on, crashes on or silently misreads."""
    body, word = line.body, line.word
    if body.startswith(("[", "]")):
        bits = re.fullmatch(r"\[\s*bits\s+(\d+)\s*\]", body, re.IGNORECASE)
        org = re.fullmatch(r"\[\s*org\s+(.+?)\s*\]", body, re.IGNORECASE)
        if bits:
            message = f"`{body}`: kvmlab reads `bits` as 16, 32 or 64 only"
        elif org:
            message = f"NASM's `{body}` is not supported: pass base={org.group(1)} to assemble()"
        else:
            message = "a statement cannot start with a bracket (NASM's `[bits 32]` is `.code32`)"
        raise AsmError(line.number, line.text, message)
    if body.startswith("%"):
        message = "NASM's preprocessor is not supported: write `.set NAME, value` for `%define`"
        raise AsmError(line.number, line.text, message)
    if word in UNSUPPORTED:
        raise AsmError(line.number, line.text, UNSUPPORTED[word])
    if word in (".align", ".balign") and line.operands:
        size = evaluate(line.operands[0], {})
        if size is not None and (size <= 0 or size & (size - 1)):  # Keystone ignores it silently
            message = f"`{word}` takes a power of 2 (a number of bytes), not {line.operands[0]}"
            raise AsmError(line.number, line.text, message)
    problem = _operand_problem(line.operands)
    if problem:
        raise AsmError(line.number, line.text, problem)


def _operand_problem(operands: list[str]) -> str | None:
    """What Keystone would silently misread in the operands (`mov eax, [ebx+` becomes [ebx])."""
    for operand in operands:
        if not operand:
            return "missing operand"
        depth, quote = 0, ""
        for i, ch in enumerate(operand):
            if quote:
                quote = "" if ch == quote and operand[i - 1] != "\\" else quote
            elif ch in "\"'":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth < 0 or operand[:i].rstrip().endswith((*_OPERATOR_END, "[")):
                    return "invalid operand"
        if depth != 0 or operand.endswith(_OPERATOR_END):
            return "invalid operand"
    return None


def _rewrite16(line: Line, source: Source) -> None:
    """Encode the 16-bit `call rel`, `ret`, `retf` and `push imm` that Keystone makes 32-bit."""
    word, ops = line.word, line.operands
    if word == "call" and len(ops) == 1 and is_immediate(ops[0], "x86"):
        target = ops[0]
        if not source.labels & set(names(target)):  # an address: make it relative to a label
            target = f"{ORIGIN} + (({target}) - {source.base:#x})"
        line.emit = f".byte 0xe8\n.word ({target}) - (. + 2)"
        line.note = (
            "Keystone encodes a 16-bit `call` as `66 e8 rel32`, which pushes a 4-byte return"
            " address; kvmlab emits `e8 rel16`"
        )
    elif word in ("ret", "retf") and len(ops) <= 1:
        opcode = (0xC3 if word == "ret" else 0xCB) - len(ops)
        line.emit = f".byte {opcode:#x}" + "".join(f"\n.word {op}" for op in ops)
        popped = "a 4-byte return address" if word == "ret" else "a 4-byte offset and selector"
        line.note = (
            f"Keystone encodes a 16-bit `{word}` as `66 {opcode:02x}`, which pops {popped};"
            f" kvmlab emits `{opcode:02x}`"
        )
    elif word == "push" and len(ops) == 1 and is_immediate(ops[0], "x86"):
        value = evaluate(ops[0], {})
        if value is not None and not -0x8000 <= value <= 0xFFFF:
            message = f"immediate {ops[0]} does not fit the 16 bits of a 16-bit push"
            raise AsmError(line.number, line.text, message)
        if value is not None and -0x80 <= value < 0x80:
            line.emit = f".byte 0x6a, {value & 0xFF:#x}"
        else:
            line.emit = f".byte 0x68\n.word {ops[0]}"
        line.note = (
            "Keystone encodes a 16-bit `push imm` as `66 68 imm32`, which pushes 4 bytes;"
            " kvmlab emits the 16-bit push"
        )
