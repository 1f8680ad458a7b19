"""Scenarios for KVM_SET_USER_MEMORY_REGION: the rules of kvm-api-notes §7, and aliasing."""

from __future__ import annotations

import mmap
from typing import Any

from kvmlab.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

from .guest import (
    CODE_ADDR,
    MEM_SIZE,
    PAGE,
    Fds,
    buffer_address,
    machine,
    regs_dict,
    set_region,
)
from .registry import scenario

SLOT_SIZE = 0x4000


def vm_and_ram(fds: Fds, size: int = MEM_SIZE) -> tuple[int, int]:
    """A fresh VM fd and the address of `size` bytes of host memory for its slots."""
    vm_fd = fds.create_vm(fds.open_kvm())
    _, hva = fds.ram(size)
    return vm_fd, hva


@scenario
def memslot_unaligned(k: Any) -> dict[str, int | str]:
    """Size, guest address and host address must all be page aligned."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "size_0x800": set_region(k, vm_fd, 0, 0, 0x800, hva),
            "size_0x1001": set_region(k, vm_fd, 0, 0, 0x1001, hva),
            "gpa_0x800": set_region(k, vm_fd, 0, 0x800, SLOT_SIZE, hva),
            "hva_plus_0x800": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva + 0x800),
            "aligned": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva),
        }
    assert out == {
        "size_0x800": "EINVAL",
        "size_0x1001": "EINVAL",
        "gpa_0x800": "EINVAL",
        "hva_plus_0x800": "EINVAL",
        "aligned": 0,
    }
    return out


@scenario
def memslot_flags(k: Any) -> dict[str, int | str]:
    """Only LOG_DIRTY_PAGES (bit 0) and READONLY (bit 1) are valid flags."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "0x4": set_region(k, vm_fd, 0, 0, PAGE, hva, 0x4),
            "0x8000": set_region(k, vm_fd, 0, 0, PAGE, hva, 0x8000),
            "0x80000000": set_region(k, vm_fd, 0, 0, PAGE, hva, 0x80000000),
            "log_dirty": set_region(k, vm_fd, 1, 0, PAGE, hva, KVM_MEM_LOG_DIRTY_PAGES),
            "readonly": set_region(k, vm_fd, 2, PAGE, PAGE, hva + PAGE, KVM_MEM_READONLY),
            "both": set_region(
                k, vm_fd, 3, 2 * PAGE, PAGE, hva, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES
            ),
        }
    assert out == {
        "0x4": "EINVAL",
        "0x8000": "EINVAL",
        "0x80000000": "EINVAL",
        "log_dirty": 0,
        "readonly": 0,
        "both": 0,
    }
    return out


@scenario
def memslot_overlap(k: Any) -> dict[str, int | str]:
    """A new or moved slot may not overlap another slot's guest range: EEXIST."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "slot0": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva),
            "overlap_tail": set_region(k, vm_fd, 1, 0x2000, SLOT_SIZE, hva),
            "overlap_same": set_region(k, vm_fd, 1, 0, SLOT_SIZE, hva),
            "inside": set_region(k, vm_fd, 1, 0x1000, PAGE, hva),
            "covering": set_region(k, vm_fd, 1, 0, 2 * SLOT_SIZE, hva),
            "adjacent": set_region(k, vm_fd, 1, SLOT_SIZE, SLOT_SIZE, hva),
            "move_onto_slot0": set_region(k, vm_fd, 1, 0x1000, SLOT_SIZE, hva),
        }
    assert out == {
        "slot0": 0,
        "overlap_tail": "EEXIST",
        "overlap_same": "EEXIST",
        "inside": "EEXIST",
        "covering": "EEXIST",
        "adjacent": 0,
        "move_onto_slot0": "EEXIST",
    }
    return out


@scenario
def memslot_modify_rejected(k: Any) -> dict[str, int | str]:
    """An existing slot cannot change its host address or size, nor gain or lose READONLY."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "create": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva),
            "new_hva": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva + PAGE),
            "grow": set_region(k, vm_fd, 0, 0, 2 * SLOT_SIZE, hva),
            "shrink": set_region(k, vm_fd, 0, 0, PAGE, hva),
            "add_readonly": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva, KVM_MEM_READONLY),
            "ro_create": set_region(k, vm_fd, 1, SLOT_SIZE, PAGE, hva, KVM_MEM_READONLY),
            "drop_readonly": set_region(k, vm_fd, 1, SLOT_SIZE, PAGE, hva),
        }
    assert out == {
        "create": 0,
        "new_hva": "EINVAL",
        "grow": "EINVAL",
        "shrink": "EINVAL",
        "add_readonly": "EINVAL",
        "ro_create": 0,
        "drop_readonly": "EINVAL",
    }
    return out


@scenario
def memslot_move_flags_identical(k: Any) -> dict[str, int | str]:
    """Moving a slot, toggling LOG_DIRTY_PAGES and repeating a call unchanged all succeed."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "create": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva),
            "identical": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva),
            "move": set_region(k, vm_fd, 0, 0x100000, SLOT_SIZE, hva),
            "old_range_free": set_region(k, vm_fd, 1, 0, SLOT_SIZE, hva),
            "log_dirty_on": set_region(k, vm_fd, 0, 0x100000, SLOT_SIZE, hva, 1),
            "log_dirty_off": set_region(k, vm_fd, 0, 0x100000, SLOT_SIZE, hva),
            "identical_again": set_region(k, vm_fd, 0, 0x100000, SLOT_SIZE, hva),
        }
    assert set(out.values()) == {0}
    return out


@scenario
def memslot_delete(k: Any) -> dict[str, int | str]:
    """memory_size 0 deletes a slot; deleting a slot that does not exist is EINVAL."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "create": set_region(k, vm_fd, 0, 0, SLOT_SIZE, hva),
            "delete": set_region(k, vm_fd, 0, 0, 0, hva),
            "delete_again": set_region(k, vm_fd, 0, 0, 0, hva),
            "delete_never_created": set_region(k, vm_fd, 7, 0, 0, 0),
            "recreate_different": set_region(k, vm_fd, 0, 0x8000, PAGE, hva + PAGE),
            "delete_other_args": set_region(k, vm_fd, 0, 0x123000, 0, 0),
            "range_free_again": set_region(k, vm_fd, 1, 0x8000, PAGE, hva),
        }
    assert out == {
        "create": 0,
        "delete": 0,
        "delete_again": "EINVAL",
        "delete_never_created": "EINVAL",
        "recreate_different": 0,
        "delete_other_args": 0,
        "range_free_again": 0,
    }
    return out


@scenario
def memslot_slot_ids(k: Any) -> dict[str, int | str]:
    """Slot ids below KVM_CAP_NR_MEMSLOTS (32764) only; bits 31:16 (address space) must be 0."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "32763": set_region(k, vm_fd, 32763, 0, PAGE, hva),
            "32764": set_region(k, vm_fd, 32764, PAGE, PAGE, hva),
            "0xffff": set_region(k, vm_fd, 0xFFFF, PAGE, PAGE, hva),
            "as1_slot1": set_region(k, vm_fd, (1 << 16) | 1, PAGE, PAGE, hva),
            "as2_slot1": set_region(k, vm_fd, (2 << 16) | 1, PAGE, PAGE, hva),
            "slot1": set_region(k, vm_fd, 1, PAGE, PAGE, hva),
        }
    assert out == {
        "32763": 0,
        "32764": "EINVAL",
        "0xffff": "EINVAL",
        "as1_slot1": "EINVAL",
        "as2_slot1": "EINVAL",
        "slot1": 0,
    }
    return out


@scenario
def memslot_address_ranges(k: Any) -> dict[str, int | str]:
    """Guest ranges that wrap or pass 2**52, and kernel host addresses, are EINVAL."""
    with Fds(k) as fds:
        vm_fd, hva = vm_and_ram(fds)
        out = {
            "gpa_wraps": set_region(k, vm_fd, 0, 0xFFFFFFFFFFFFF000, 2 * PAGE, hva),
            "gpa_2_52": set_region(k, vm_fd, 0, 1 << 52, PAGE, hva),
            "gpa_4g": set_region(k, vm_fd, 0, 1 << 32, PAGE, hva),
            "hva_kernel": set_region(k, vm_fd, 1, 0, PAGE, 0xFFFF888000000000),
            "hva_top": set_region(k, vm_fd, 1, 0, PAGE, 0xFFFFFFFFFFFFF000),
            "hva_zero": set_region(k, vm_fd, 1, 0, PAGE, 0),
        }
    assert out == {
        "gpa_wraps": "EINVAL",
        "gpa_2_52": "EINVAL",
        "gpa_4g": 0,
        "hva_kernel": "EINVAL",
        "hva_top": "EINVAL",
        "hva_zero": 0,
    }
    return out


@scenario
def memslot_unmapped_hva_accepted(k: Any) -> dict[str, int | str]:
    """A user address with nothing mapped is accepted: KVM only checks it at fault time."""
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        gone = mmap.mmap(-1, 4 * PAGE)
        hva = buffer_address(gone)
        gone.close()  # the range is now unmapped (nothing else maps there during this test)
        out = {"unmapped": set_region(k, vm_fd, 0, 0, 4 * PAGE, hva)}
        out["delete"] = set_region(k, vm_fd, 0, 0, 0, hva)
    assert out == {"unmapped": 0, "delete": 0}
    return out


# 32-bit guest: write through the alias at GPA 0x10000, read the same byte through GPA 0.
ALIAS_CODE = (
    b"\xb8\x0d\xf0\xfe\xca"  # 1000: mov eax, 0xcafef00d
    b"\xa3\x00\x20\x01\x00"  # 1005: mov dword ptr [0x12000], eax
    b"\x8b\x1d\x00\x20\x00\x00"  # 100a: mov ebx, dword ptr [0x2000]
    b"\xf4"  # 1010: hlt
)


@scenario
def memslot_aliasing(k: Any) -> dict[str, Any]:
    """Two slots may share one host buffer: a guest write through one is read through the other."""
    with machine(k, ALIAS_CODE, "prot32") as m:
        alias = set_region(k, m.vm_fd, 1, 0x10000, MEM_SIZE, m.hva)
        assert alias == 0
        exit_reason = m.run()
        regs = regs_dict(m.regs())
        host_view = m.u32(0x2000)
    assert exit_reason == 5
    assert regs["rbx"] == 0xCAFEF00D == host_view
    assert regs["rip"] == CODE_ADDR + len(ALIAS_CODE)
    return {"alias": alias, "exit_reason": exit_reason, "regs": regs, "host_view": host_view}
