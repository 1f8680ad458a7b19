"""Snapshots for Back: what a reverse step puts back, kept cheap.

A snapshot holds the vCPU's registers and segment registers, every device's state, the
machine's run state and the length of the exit log. Guest RAM is not copied whole: after each
action the pages that differ from a shadow copy are found (a page compare of a small guest
costs microseconds) and only their old contents are kept, as an undo record.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvmlab.vmm import Machine

PAGE = 0x1000
_SCALARS = (int, float, str, bytes, bytearray, type(None))
_CONTAINERS = (list, tuple, deque, set, dict)


def plain(value: Any) -> bool:
    """Data a device owns (numbers, buffers, queues of them), not a link to another object."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, dict):
        return all(plain(k) and plain(v) for k, v in value.items())
    if isinstance(value, _CONTAINERS):
        return all(plain(v) for v in value)
    return False


def device_state(device: Any) -> dict[str, Any]:
    """A device's registers and buffers (its plain instance fields): no callbacks, locks, timers
    or other devices."""
    return {name: _copy(v) for name, v in vars(device).items() if plain(v)}


def _copy(value: Any) -> Any:
    if isinstance(value, int | float | str | bytes | type(None)):
        return value
    if isinstance(value, bytearray):
        return bytearray(value)
    return copy.deepcopy(value)


def set_device_state(device: Any, state: dict[str, Any]) -> None:
    vars(device).update({name: _copy(value) for name, value in state.items()})


@dataclass
class MachineState:
    """The VMM side of a machine at one moment (the vCPU side is regs/sregs)."""

    regs: bytes
    sregs: bytes
    devices: list[dict[str, Any]]
    state: str
    exit_code: int | None
    resets: int
    log_length: int
    halted: bool
    interrupt_request: int
    if_flag: bool


def devices_of(m: Machine) -> list[Any]:
    return m.io.devices() + m.mmio.devices()


def save_machine(m: Machine, regs: bytes, sregs: bytes) -> MachineState:
    """Everything of `m` that Back restores, besides RAM (see RamUndo)."""
    cpu = m.cpus[0]
    return MachineState(
        regs,
        sregs,
        [device_state(d) for d in devices_of(m)],
        m.state,
        m.exit_code,
        m.resets,
        len(m.exit_log),
        cpu.halted,
        cpu.interrupt_request,
        cpu.if_flag,
    )


def load_machine(m: Machine, s: MachineState) -> None:
    """Put back what save_machine took (registers are the caller's: see Workbench.back)."""
    for device, state in zip(devices_of(m), s.devices, strict=True):
        set_device_state(device, state)
    m.state, m.exit_code, m.resets = s.state, s.exit_code, s.resets
    del m.exit_log.records[s.log_length :]
    cpu = m.cpus[0]
    cpu.halted, cpu.interrupt_request, cpu.if_flag = s.halted, s.interrupt_request, s.if_flag


@dataclass
class RamUndo:
    """The old contents of the pages one action changed: {gpa of the page: bytes}."""

    pages: dict[int, bytes] = field(default_factory=dict)


class RamShadow:
    """A copy of guest RAM as it was after the last action, to find what the next one changed."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.copies = [bytes(block.mem) for block in m.ram_blocks]

    def changes(self) -> tuple[RamUndo, dict[int, bytes]]:
        """(undo record, {gpa: new page}) for the pages that differ from the shadow; the shadow
        then follows RAM."""
        undo = RamUndo()
        new: dict[int, bytes] = {}
        for i, block in enumerate(self.m.ram_blocks):
            now = bytes(block.mem)
            old = self.copies[i]
            if now == old:
                continue
            for offset in range(0, len(now), PAGE):
                if now[offset : offset + PAGE] != old[offset : offset + PAGE]:
                    undo.pages[block.gpa + offset] = old[offset : offset + PAGE]
                    new[block.gpa + offset] = now[offset : offset + PAGE]
            self.copies[i] = now
        return undo, new

    def undo(self, record: RamUndo) -> None:
        """Write the old pages back into RAM and into the shadow."""
        for gpa, data in record.pages.items():
            self.m.memory_write(gpa, data)
        self.copies = [bytes(block.mem) for block in self.m.ram_blocks]
