"""`struct kvm_run` decoded field by field, with offsets, from the bytes of the mmap'ed page.

Everything is read from kvmlab.uapi's ctypes layout (one truth per fact): the header every
exit fills, the union member the exit reason makes active, and where `io.data_offset` points.
https://elixir.bootlin.com/linux/latest/source/include/uapi/linux/kvm.h (struct kvm_run)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_UNKNOWN,
    KVM_INTERNAL_ERROR_EMULATION,
    kvm_run,
)

HEADER_SIZE = kvm_run.exit.offset  # request_interrupt_window .. apic_base
SHOWN_SIZE = kvm_run.kvm_valid_regs.offset  # header + exit union: what KVM_RUN reports
EXIT_UNION: Any = dict((f[0], f[1]) for f in kvm_run._fields_)["exit"]
MEMBERS: dict[str, Any] = dict((f[0], f[1]) for f in EXIT_UNION._fields_)
ACTIVE_MEMBER = {
    KVM_EXIT_IO: "io",
    KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_DEBUG: "debug",
    KVM_EXIT_EXCEPTION: "ex",
    KVM_EXIT_FAIL_ENTRY: "fail_entry",
    KVM_EXIT_UNKNOWN: "hw",
    KVM_EXIT_HYPERCALL: "hypercall",
    KVM_EXIT_SYSTEM_EVENT: "system_event",
    KVM_EXIT_INTERNAL_ERROR: "internal",
}


@dataclass(frozen=True)
class Field:
    """One field of kvm_run: its C path (`io.port`), offset in the page, size and value."""

    name: str
    offset: int
    size: int
    value: Any  # int, or bytes for arrays

    def text(self) -> str:
        if isinstance(self.value, bytes):
            return self.value.hex(" ")
        return f"{self.value:#x}" if self.value > 9 else str(self.value)


@dataclass(frozen=True)
class KvmRunView:
    """What the kvm_run panel shows for the bytes of one exit."""

    exit_reason: int
    reason_name: str
    header: list[Field]
    member: str | None  # the active union member, e.g. "io"
    member_fields: list[Field]
    header_bytes: bytes
    member_bytes: bytes
    data_offset: int | None  # io.data_offset, an offset into the vCPU's mmap'ed area
    data: bytes  # the size * count bytes found there
    changed: list[str]  # fields whose bytes differ from the previous exit


def flatten(ctype: Any, base: int, raw: bytes, prefix: str = "") -> list[Field]:
    """Every leaf field of the ctypes structure `ctype` found at `base` in `raw`."""
    fields = []
    for entry in ctype._fields_:
        name, sub = entry[0], entry[1]
        if name.startswith("pad"):
            continue
        offset = base + getattr(ctype, name).offset
        size = ctypes.sizeof(sub)
        if isinstance(sub, type) and issubclass(sub, ctypes.Structure):
            fields += flatten(sub, offset, raw, f"{prefix}{name}.")
            continue
        chunk = raw[offset : offset + size]
        value: Any = chunk if issubclass(sub, ctypes.Array) else int.from_bytes(chunk, "little")
        fields.append(Field(prefix + name, offset, size, value))
    return fields


def member_name(exit_reason: int, raw: bytes) -> str | None:
    """The union member KVM filled for `exit_reason` (emulation_failure for that suberror)."""
    member = ACTIVE_MEMBER.get(exit_reason)
    if member == "internal":
        suberror = int.from_bytes(raw[HEADER_SIZE : HEADER_SIZE + 4], "little")
        if suberror == KVM_INTERNAL_ERROR_EMULATION:
            return "emulation_failure"
    return member


def decode(page: bytes, previous: bytes | None = None) -> KvmRunView:
    """Decode the vCPU's mmap'ed area `page` (kvm_run, then the PIO page); `previous` is the
    same area at the exit before, for the list of changed fields."""
    raw = page[:SHOWN_SIZE]
    header = [f for f in flatten(kvm_run, 0, raw) if f.offset < HEADER_SIZE]
    reason = next(f.value for f in header if f.name == "exit_reason")
    member = member_name(reason, raw)
    member_fields: list[Field] = []
    member_bytes = b""
    if member is not None:
        sub = MEMBERS[member]
        start = HEADER_SIZE + getattr(EXIT_UNION, member).offset
        member_fields = flatten(sub, start, raw, f"{member}.")
        member_bytes = raw[start : start + ctypes.sizeof(sub)]
    data_offset = None
    data = b""
    if member == "io":
        io = {f.name: f.value for f in member_fields}
        data_offset = io["io.data_offset"]
        data = bytes(page[data_offset : data_offset + io["io.size"] * io["io.count"]])
    changed = []
    if previous is not None:
        for f in header + member_fields:
            if previous[f.offset : f.offset + f.size] != raw[f.offset : f.offset + f.size]:
                changed.append(f.name)
    return KvmRunView(
        reason,
        EXIT_REASON_NAMES.get(reason, str(reason)),
        header,
        member,
        member_fields,
        bytes(raw[:HEADER_SIZE]),
        bytes(member_bytes),
        data_offset,
        data,
        changed,
    )
