"""What the assembler hands back: the bytes, a listing that ties them to source lines, and the
warnings and errors, each with the line it is about."""

from __future__ import annotations

from dataclasses import dataclass, field


class AsmError(Exception):
    """A source that cannot be assembled correctly, pinned to its 1-based line."""

    def __init__(self, line: int, text: str, message: str) -> None:
        super().__init__(line, text, message)
        self.line = line
        self.text = text
        self.message = message

    def __str__(self) -> str:
        return f"line {self.line}: {self.text.strip()} : {self.message}"


@dataclass(frozen=True)
class AsmWarning:
    """Bytes that assembled but may not do what the line says (a Keystone bug kvmlab cannot fix)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ListingLine:
    """One source line and the bytes it became at `address` (empty for labels and comments).

    `note` says when kvmlab rewrote the line: a NASM habit read as Keystone's directive, or
    an instruction encoded by kvmlab because Keystone gets it wrong.
    """

    line: int
    text: str
    address: int
    data: bytes
    mode: str
    note: str | None = None


@dataclass(frozen=True)
class Program:
    """Assembled code loaded at `base`, with one listing line per source line."""

    code: bytes
    base: int
    mode: str
    arch: str
    labels: dict[str, int]
    lines: list[ListingLine]
    warnings: list[AsmWarning] = field(default_factory=list)

    def line_at(self, address: int) -> int | None:
        """The source line whose bytes hold `address` (e.g. the guest's rip), or None."""
        for entry in self.lines:
            if entry.address <= address < entry.address + len(entry.data):
                return entry.line
        return None

    def listing(self) -> str:
        """The classic listing: address, bytes and source side by side."""
        rows = []
        for entry in self.lines:
            where = f"{entry.address:08x}" if entry.data else " " * 8
            rows.append(f"{entry.line:4}  {where}  {entry.data.hex(' '):<24}  {entry.text}")
        return "\n".join(row.rstrip() for row in rows)
