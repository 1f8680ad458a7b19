"""Disassembly with Capstone, for the widgets' code panel and for checking Keystone's output."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import capstone

ARCHES = ("x86", "arm64")
X86_MODES = ("16", "32", "64")
_per_thread = threading.local()


@dataclass(frozen=True)
class Insn:
    """One decoded instruction (or `.byte` for bytes that do not decode)."""

    address: int
    bytes: bytes
    mnemonic: str
    op_str: str

    def __str__(self) -> str:
        return (
            f"{self.address:#x}: {self.bytes.hex(' '):<24} {self.mnemonic} {self.op_str}".rstrip()
        )


def check_target(arch: str, mode: str | None) -> str:
    """Validate `arch` and `mode` and return the mode: 16 by default on x86, always 64 on arm64."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, not {arch!r}")
    if arch == "arm64":
        if mode not in (None, "64"):
            raise ValueError(f"arm64 has only mode '64', not {mode!r}")
        return "64"
    if mode is None:
        return "16"
    if mode not in X86_MODES:
        raise ValueError(f"x86 mode must be one of {X86_MODES}, not {mode!r}")
    return mode


def capstone_for(arch: str, mode: str, detail: bool = False) -> capstone.Cs:
    """A Capstone decoder for `arch` and `mode`, one per thread: a handle is not thread-safe."""
    decoders: dict[tuple[str, str, bool], capstone.Cs]
    decoders = _per_thread.__dict__.setdefault("decoders", {})
    key = (arch, mode, detail)
    if key not in decoders:
        if arch == "arm64":
            cs = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        else:
            cs = capstone.Cs(capstone.CS_ARCH_X86, getattr(capstone, f"CS_MODE_{mode}"))
        cs.detail = detail
        decoders[key] = cs
    return decoders[key]


def disassemble(
    code: bytes, *, mode: str | None = None, base: int = 0, arch: str = "x86"
) -> list[Insn]:
    """Decode all of `code` as if loaded at `base`; bytes that do not decode become `.byte`
    (one byte on x86, an aligned word on arm64) and decoding goes on after them."""
    mode = check_target(arch, mode)
    cs = capstone_for(arch, mode)
    step = 4 if arch == "arm64" else 1
    insns: list[Insn] = []
    offset = 0
    while offset < len(code):
        for address, size, mnemonic, op_str in cs.disasm_lite(code[offset:], base + offset):
            insns.append(Insn(address, code[offset : offset + size], mnemonic, op_str))
            offset += size
        if offset < len(code):
            bad = code[offset : offset + step]
            insns.append(Insn(base + offset, bad, ".byte", ", ".join(f"{b:#04x}" for b in bad)))
            offset += len(bad)
    return insns
