"""GNU `as` as a second assembler, to check Keystone against where binutils is installed.

kvmlab's dialect differs from GNU `as`'s Intel syntax in one way that matters: a bare label
is an immediate for Keystone (as in NASM: `mov si, msg` loads msg's address) but a memory
operand for GNU `as` (as in MASM). The translation below writes `offset` in front of such
operands and leaves branch targets alone; the source is otherwise what `parse` read (NASM
habits already rewritten, comments gone), before any of kvmlab's Keystone repairs. The
object is linked at `base` into a flat binary with `ld`.
https://sourceware.org/binutils/docs/as/i386_002dVariations.html
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvmlab.asm.expr import names
from kvmlab.asm.program import AsmError
from kvmlab.asm.source import Line, parse, split_operands

_BRANCH = re.compile(r"j\w+|call|loop\w*")
_LABEL_DIFFERENCE = re.compile(r"[\w.$]\s*-\s*[A-Za-z_.$]")  # `end - start`: a plain number
TIMEOUT = 10.0


def gnu_as_missing() -> str | None:
    """Why GNU `as` cannot be used here (None when `as` and `ld` are both installed)."""
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    return f"binutils' {' and '.join(missing)} not installed" if missing else None


def assemble_gnu(source: str, *, mode: str = "16", base: int = 0) -> bytes:
    """The bytes GNU `as` makes of kvmlab source `source`, loaded at `base` (x86 only)."""
    why = gnu_as_missing()
    if why is not None:
        raise RuntimeError(f"GNU as cannot be used: {why}")
    parsed = parse(source, arch="x86", mode=mode, base=base)
    text = [".intel_syntax noprefix", f".code{mode}"]
    for line in parsed.lines:
        text += [f"{label}:" for label in line.labels]
        text.append(_gnu_statement(line, parsed.labels))
    with tempfile.TemporaryDirectory(prefix="kvmlab-gas-") as tmp:
        work = Path(tmp)
        (work / "guest.s").write_text("\n".join(text) + "\n")
        bits, emulation = ("--64", "elf_x86_64") if mode == "64" else ("--32", "elf_i386")
        _run(["as", bits, "-o", "guest.o", "guest.s"], work, parsed.lines)
        flat = ["-m", emulation, f"-Ttext={base:#x}", "--oformat", "binary"]
        _run(["ld", *flat, "-o", "guest.bin", "guest.o"], work, parsed.lines)
        return (work / "guest.bin").read_bytes()


def _gnu_statement(line: Line, labels: set[str]) -> str:
    """`line`'s statement for GNU `as`: `offset` before bare label operands of non-branches."""
    if not line.is_instruction or _BRANCH.fullmatch(line.word):
        return line.body
    mnemonic, _, rest = line.body.partition(" ")
    operands = []
    for operand in split_operands(rest) if rest.strip() else []:
        bare = "[" not in operand and "ptr" not in operand.lower()
        if bare and set(names(operand)) & labels and not _LABEL_DIFFERENCE.search(operand):
            operand = f"offset {operand}"
        operands.append(operand)
    return f"{mnemonic} {', '.join(operands)}".strip()


def _run(command: list[str], cwd: Path, lines: list[Line]) -> None:
    """Run a binutils step; its first error becomes an AsmError on the source line it names."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    if result.returncode == 0:
        return
    message = result.stderr.strip() or f"{command[0]} failed ({result.returncode})"
    where = re.search(r"guest\.s:(\d+): (?:Error|Warning): (.*)", message)
    if where is None:
        raise AsmError(0, "", f"GNU {command[0]}: {message.splitlines()[0]}")
    statement = int(where.group(1))  # a line of guest.s: map it back through the labels
    emitted = 2
    for line in lines:
        emitted += len(line.labels) + 1
        if emitted >= statement:
            raise AsmError(line.number, line.text, f"GNU as: {where.group(2)}")
    raise AsmError(0, "", f"GNU as: {where.group(2)}")
