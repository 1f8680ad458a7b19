"""Code the host rewrites between runs: the guest must run the new bytes, as on real KVM.

The simulator's CPU caches translated code, so these pin that a host write to guest RAM is
seen by the next KVM_RUN even in code the guest already executed (entry page and a page
reached only by a call).
"""

from __future__ import annotations

from typing import Any

from kvmlab.uapi import KVM_EXIT_HLT, KVM_EXIT_IO

from .guest import CODE_ADDR, machine
from .registry import scenario

SUB_ADDR = 0x3000  # a subroutine on another page


def _out_then_hlt(value: int) -> bytes:
    return bytes([0xB0, value, 0xE6, 0x10, 0xF4])  # mov al, value / out 0x10, al / hlt


@scenario
def host_rewrites_entry_code(k: Any) -> dict[str, Any]:
    """Run code, rewrite it in place, rerun from the same rip: the new value comes out."""
    seen = []
    with machine(k, _out_then_hlt(0x11)) as m:
        for value in (0x11, 0x22, 0x33):
            m.mem[CODE_ADDR : CODE_ADDR + 5] = _out_then_hlt(value)
            m.update_regs(rip=CODE_ADDR)
            assert m.run() == KVM_EXIT_IO
            seen.append(m.io()["data"])
            assert m.run() == KVM_EXIT_HLT
    assert seen == [b"\x11", b"\x22", b"\x33"]
    return {"seen": seen}


@scenario
def host_rewrites_called_code(k: Any) -> dict[str, Any]:
    """A subroutine on its own page, reached by `call`, rewritten between runs."""
    main = bytes([0xE8]) + (SUB_ADDR - (CODE_ADDR + 3)).to_bytes(2, "little") + b"\xf4"
    sub = bytes([0xB0, 0x41, 0xE6, 0x10, 0xC3])  # mov al, 'A' / out 0x10, al / ret
    seen = []
    with machine(k, main) as m:
        for value in (0x41, 0x42):
            m.mem[SUB_ADDR : SUB_ADDR + 5] = bytes([0xB0, value]) + sub[2:]
            m.update_regs(rip=CODE_ADDR, rsp=0x8000)
            for _ in range(4):
                reason = m.run()
                if reason == KVM_EXIT_HLT:
                    break
                assert reason == KVM_EXIT_IO
                seen.append(m.io()["data"])
    assert seen == [b"A", b"B"]
    return {"seen": seen}
