"""Memory slots: KVM_SET_USER_MEMORY_REGION's checks, and the slot set a VM's vCPUs map.

Follows `__kvm_set_memory_region` in virt/kvm/kvm_main.c: the same checks in the same order, the
same four kinds of change (create, delete, move, flags-only), and a generation number that
tells each vCPU when to re-map (KVM's memslot generation plays the same part).
https://elixir.bootlin.com/linux/v6.12/source/virt/kvm/kvm_main.c#L1987
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import access_ok, fail
from kvmlab.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, kvm_userspace_memory_region

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_PRIVATE_MEM_SLOTS = 3
KVM_MEM_SLOTS_NUM = 0x7FFF - KVM_PRIVATE_MEM_SLOTS  # SHRT_MAX - private slots
KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM  # 32764, reported by KVM_CAP_NR_MEMSLOTS
KVM_ADDRESS_SPACE_NUM = 1  # no SMM address space: KVM_CAP_MULTI_ADDRESS_SPACE is 0
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
MAX_GPA_BITS = 52  # kvm_mmu_max_gfn() with shadow paging
VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


class MemoryChange(Enum):
    """enum kvm_mr_change."""

    CREATE = "KVM_MR_CREATE"
    DELETE = "KVM_MR_DELETE"
    MOVE = "KVM_MR_MOVE"
    FLAGS_ONLY = "KVM_MR_FLAGS_ONLY"


@dataclass
class KvmMemorySlot:
    """struct kvm_memory_slot: guest frames [base_gfn, base_gfn+npages) backed at userspace_addr."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int
    dirty_bitmap: bytearray | None = None

    @property
    def gpa(self) -> int:
        return self.base_gfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return self.npages << PAGE_SHIFT

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)


class KvmMemslots:
    """struct kvm_memslots: one address space's slots, and the generation of the set."""

    def __init__(self) -> None:
        self.slots: dict[int, KvmMemorySlot] = {}
        self.generation = 0

    def __iter__(self) -> Iterator[KvmMemorySlot]:
        return iter(sorted(self.slots.values(), key=lambda s: s.base_gfn))

    def gfn_to_memslot(self, gfn: int) -> KvmMemorySlot | None:
        for slot in self.slots.values():
            if slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
                return slot
        return None

    def overlaps(self, id_: int, start: int, end: int) -> bool:
        """kvm_check_memslot_overlap: does [start, end) meet a slot other than `id_`?"""
        return any(
            s.id != id_ and start < s.base_gfn + s.npages and s.base_gfn < end
            for s in self.slots.values()
        )


def check_memory_region_flags(mem: kvm_userspace_memory_region) -> None:
    if mem.flags & ~VALID_FLAGS:
        fail(errno.EINVAL)


@traced("__kvm_set_memory_region")
def set_memory_region(
    memslots: list[KvmMemslots], mem: kvm_userspace_memory_region
) -> MemoryChange | None:
    """__kvm_set_memory_region: validate `mem`, apply it, return the change (None = no-op)."""
    check_memory_region_flags(mem)
    as_id, id_ = mem.slot >> 16, mem.slot & 0xFFFF
    if mem.memory_size & (PAGE_SIZE - 1):
        fail(errno.EINVAL)
    if mem.guest_phys_addr & (PAGE_SIZE - 1):
        fail(errno.EINVAL)
    if mem.userspace_addr & (PAGE_SIZE - 1) or not access_ok(mem.userspace_addr, mem.memory_size):
        fail(errno.EINVAL)
    if as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= KVM_MEM_SLOTS_NUM:
        fail(errno.EINVAL)
    if mem.guest_phys_addr + mem.memory_size >= 1 << 64:
        fail(errno.EINVAL)
    if (mem.memory_size >> PAGE_SHIFT) > KVM_MEM_MAX_NR_PAGES:
        fail(errno.EINVAL)

    slots = memslots[as_id]
    old = slots.slots.get(id_)
    if mem.memory_size == 0:
        if old is None:
            fail(errno.EINVAL)
        note(MemoryChange.DELETE.value, slot=id_)
        del slots.slots[id_]
        slots.generation += 1
        return MemoryChange.DELETE

    base_gfn = mem.guest_phys_addr >> PAGE_SHIFT
    npages = mem.memory_size >> PAGE_SHIFT
    if old is None:
        change = MemoryChange.CREATE
    else:
        if (
            mem.userspace_addr != old.userspace_addr
            or npages != old.npages
            or (mem.flags ^ old.flags) & KVM_MEM_READONLY
        ):
            fail(errno.EINVAL)
        if base_gfn != old.base_gfn:
            change = MemoryChange.MOVE
        elif mem.flags != old.flags:
            change = MemoryChange.FLAGS_ONLY
        else:
            note("nothing to change", slot=id_)
            return None
    note(change.value, slot=id_, base_gfn=base_gfn, npages=npages)
    if change in (MemoryChange.CREATE, MemoryChange.MOVE):
        if slots.overlaps(id_, base_gfn, base_gfn + npages):
            fail(errno.EEXIST)
        # kvm_arch_prepare_memory_region (x86): the last frame must be addressable
        if base_gfn + npages - 1 > (1 << (MAX_GPA_BITS - PAGE_SHIFT)) - 1:
            fail(errno.EINVAL)

    dirty = bytearray(((npages + 63) // 64) * 8) if mem.flags & KVM_MEM_LOG_DIRTY_PAGES else None
    if old is not None and change is MemoryChange.FLAGS_ONLY and old.dirty_bitmap is not None:
        dirty = old.dirty_bitmap if dirty is not None else None
    slots.slots[id_] = KvmMemorySlot(
        id_, as_id, base_gfn, npages, mem.userspace_addr, mem.flags, dirty
    )
    slots.generation += 1
    return change
