"""Scenarios for dirty page logging: KVM_MEM_LOG_DIRTY_PAGES and KVM_GET_DIRTY_LOG (kvm-api-notes
§7, "Flag semantics").

KVM keeps one bit per page of a logging slot (bit 0 = the slot's first page) and KVM_GET_DIRTY_LOG
copies ALIGN(npages, 64) / 8 bytes to the user pointer, then clears the log. Writes by the guest
and by KVM itself (e.g. completing an INS) are logged; userspace writes through its own mapping
are not. The bitmap buffers here are longer than needed and pre-filled with 0xee, so the results
also show exactly how many bytes KVM wrote.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

from kvmlab.uapi import (
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_GET_DIRTY_LOG,
    KVM_MEM_LOG_DIRTY_PAGES,
    kvm_dirty_log,
)

from .guest import PAGE, Machine, machine, set_region, try_ioctl
from .registry import scenario

LOG_GPA = 0x10000  # the logging slot (slot 1), right after machine()'s RAM
CANARY = 0xEE
NR_MEMSLOTS = 32764  # KVM_CAP_NR_MEMSLOTS on x86: slot ids 0..32763


def get_dirty_log(m: Machine, slot: int, size: int = 16) -> tuple[int | str, bytes]:
    """KVM_GET_DIRTY_LOG into a `size`-byte buffer pre-filled with CANARY: (result, buffer)."""
    buf = ctypes.create_string_buffer(bytes([CANARY]) * size, size)
    arg = kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(buf))
    r = try_ioctl(m.k, m.vm_fd, KVM_GET_DIRTY_LOG, bytes(arg))
    return r, buf.raw


def add_log_slot(
    m: Machine, pages: int, flags: int = KVM_MEM_LOG_DIRTY_PAGES
) -> tuple[mmap.mmap, int]:
    """Slot 1: `pages` pages of fresh host memory at LOG_GPA; returns that memory and its hva."""
    mem, hva = m.fds.ram(pages * PAGE)
    assert set_region(m.k, m.vm_fd, 1, LOG_GPA, pages * PAGE, hva, flags) == 0
    return mem, hva


WRITE_CODE = (
    b"\xbe\x00\x30\x01\x00"  # 1000: mov esi, 0x13000 (page 3 of the slot)
    b"\xc6\x06\x01"  # 1005: mov byte ptr [esi], 1
    b"\xc7\x86\x00\x20\x00\x00\x02\x00\x00\x00"  # 1008: mov dword ptr [esi + 0x2000], 2 (page 5)
    b"\x8b\x86\x00\x10\x00\x00"  # 1012: mov eax, dword ptr [esi + 0x1000] (page 4: a read)
    b"\xf4"  # 1018: hlt
    b"\xbf\x00\x60\x01\x00"  # 1019: mov edi, 0x16000 (page 6)
    b"\x66\xba\x60\x00"  # 101e: mov dx, 0x60
    b"\x6c"  # 1022: insb byte ptr es:[edi], dx
    b"\xf4"  # 1023: hlt
)


@scenario
def dirty_log_guest_writes(k: Any) -> dict[str, Any]:
    """An 8-page logging slot: nothing is dirty at first; guest writes to pages 3 and 5 (and a
    read of page 4) give 0x28; reading the log clears it; a host write to page 7 is not logged;
    an INS completed by KVM into page 6 is (0x40). KVM writes 8 bytes (one u64)."""
    with machine(k, WRITE_CODE, "prot32") as m:
        mem, _ = add_log_slot(m, 8)
        out: dict[str, Any] = {"initial": get_dirty_log(m, 1)}
        first = m.run()
        out["after_guest_writes"] = get_dirty_log(m, 1)
        out["read_again"] = get_dirty_log(m, 1)
        mem[7 * PAGE] = 0x77
        out["after_host_write"] = get_dirty_log(m, 1)
        second = m.run()
        m.fill_in(b"\x42")
        third = m.run()
        out["after_ins"] = get_dirty_log(m, 1)
        out["ins_byte"] = mem[6 * PAGE]
        out["exits"] = (first, second, third)
    clean = bytes(8) + bytes([CANARY]) * 8
    assert out["exits"] == (KVM_EXIT_HLT, KVM_EXIT_IO, KVM_EXIT_HLT)
    assert out["initial"] == (0, clean)
    assert out["after_guest_writes"] == (0, b"\x28" + bytes(7) + bytes([CANARY]) * 8)
    assert out["read_again"] == (0, clean)
    assert out["after_host_write"] == (0, clean)
    assert out["after_ins"] == (0, b"\x40" + bytes(7) + bytes([CANARY]) * 8)
    assert out["ins_byte"] == 0x42
    return out


WIDE_CODE = (
    b"\xbe\x00\x00\x01\x00"  # 1000: mov esi, 0x10000
    b"\xc6\x06\x01"  # 1005: mov byte ptr [esi], 1 (page 0)
    b"\xc6\x86\x00\x60\x04\x00\x01"  # 1008: mov byte ptr [esi + 0x46000], 1 (page 70)
    b"\xc6\x86\xff\x7f\x04\x00\x01"  # 100f: mov byte ptr [esi + 0x47fff], 1 (page 71)
    b"\xf4"  # 1016: hlt
)


@scenario
def dirty_log_bitmap_size(k: Any) -> dict[str, Any]:
    """A 72-page slot: the bitmap is ALIGN(72, 64) / 8 = 16 bytes (two u64s); pages 0, 70 and 71
    are bits 0, 70 and 71. KVM writes exactly those 16 bytes."""
    with machine(k, WIDE_CODE, "prot32") as m:
        add_log_slot(m, 72)
        reason = m.run()
        log = get_dirty_log(m, 1, 24)
    expected = (1 | 1 << 70 | 1 << 71).to_bytes(16, "little") + bytes([CANARY]) * 8
    assert reason == KVM_EXIT_HLT
    assert log == (0, expected)
    return {"exit": reason, "log": log}


TOGGLE_CODE = (
    b"\xc6\x05\x00\x30\x01\x00\x01"  # 1000: mov byte ptr [0x13000], 1 (page 3)
    b"\xf4"  # 1007: hlt
    b"\xc6\x05\x00\x50\x01\x00\x01"  # 1008: mov byte ptr [0x15000], 1 (page 5)
    b"\xf4"  # 100f: hlt
    b"\xc6\x05\x00\x40\x01\x00\x01"  # 1010: mov byte ptr [0x14000], 1 (page 4)
    b"\xf4"  # 1017: hlt
)


@scenario
def dirty_log_toggled(k: Any) -> dict[str, Any]:
    """Logging switched on and off on an existing slot (a FLAGS_ONLY change): ENOENT while off;
    writes from before it was switched on are not in the log; writes while on are."""
    with machine(k, TOGGLE_CODE, "prot32") as m:
        _, hva = add_log_slot(m, 8, flags=0)
        out: dict[str, Any] = {"exit1": m.run(), "off": get_dirty_log(m, 1)}

        def flags(value: int) -> int | str:
            return set_region(m.k, m.vm_fd, 1, LOG_GPA, 8 * PAGE, hva, value)

        out["enable"] = flags(KVM_MEM_LOG_DIRTY_PAGES)
        out["on_before_writes"] = get_dirty_log(m, 1)
        out["exit2"] = m.run()
        out["on_after_write"] = get_dirty_log(m, 1)
        out["disable"] = flags(0)
        out["exit3"] = m.run()
        out["off_again"] = get_dirty_log(m, 1)
    untouched = bytes([CANARY]) * 16
    assert out["off"] == ("ENOENT", untouched) and out["off_again"] == ("ENOENT", untouched)
    assert (out["enable"], out["disable"]) == (0, 0)
    assert out["on_before_writes"] == (0, bytes(8) + bytes([CANARY]) * 8)
    assert out["on_after_write"] == (0, b"\x20" + bytes(7) + bytes([CANARY]) * 8)
    assert (out["exit1"], out["exit2"], out["exit3"]) == (KVM_EXIT_HLT,) * 3
    return out


@scenario
def dirty_log_errors(k: Any) -> dict[str, Any]:
    """KVM_GET_DIRTY_LOG: ENOENT for a slot without LOG_DIRTY_PAGES and for an id with no slot
    (up to 32763); EINVAL for an id >= KVM_CAP_NR_MEMSLOTS (32764) or address space 1. The
    buffer is not touched."""
    with machine(k, b"\xf4") as m:
        add_log_slot(m, 8)
        out = {
            "slot0_no_flag": get_dirty_log(m, 0),
            "slot5_absent": get_dirty_log(m, 5),
            "slot32763": get_dirty_log(m, NR_MEMSLOTS - 1),
            "slot32764": get_dirty_log(m, NR_MEMSLOTS),
            "as1_slot1": get_dirty_log(m, 1 << 16 | 1),
            "slot1": get_dirty_log(m, 1),
        }
    untouched = bytes([CANARY]) * 16
    assert {key: r for key, (r, _) in out.items()} == {
        "slot0_no_flag": "ENOENT",
        "slot5_absent": "ENOENT",
        "slot32763": "ENOENT",
        "slot32764": "EINVAL",
        "as1_slot1": "EINVAL",
        "slot1": 0,
    }
    assert all(buf == untouched for key, (_, buf) in out.items() if key != "slot1")
    return out
