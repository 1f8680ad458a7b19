"""UcStage2, the guest-physical map of a vCPU's Unicorn engine, on a bare engine of each kind.

What KVM's EPT / stage-2 tables would give the guest: the slots' own pages (shared memory
through an alias, private memory as it is), no write where the slot is read-only, a write
fault per page where it is dirty-logged, EFAULT where the host memory is missing, MMIO where
no slot is, and code the host rewrote run afresh. A closed vCPU frees its engine at once.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
from collections.abc import Iterator

import pytest
from unicorn import (
    UC_ARCH_X86,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ,
    UC_MODE_64,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
)
from unicorn.x86_const import UC_X86_REG_RAX

from kvmlab.kernel.arch.arm64 import hyp
from kvmlab.kernel.arch.x86 import uc as x86_uc
from kvmlab.kernel.memslots import PAGE_SIZE, KvmMemorySlot, KvmMemslots
from kvmlab.kernel.uc_stage2 import UcStage2
from kvmlab.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
_libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
RW = mmap.PROT_READ | mmap.PROT_WRITE
SHARED = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
PAGES = 4
GPA = 0x10000


def is_mapped(addr: int, size: int) -> bool:
    return _libc.msync(addr, size, 1) == 0  # MS_ASYNC: ENOMEM where anything is unmapped


class Host:
    """Anonymous host mappings for slots; what the test did not unmap goes at its end."""

    def __init__(self) -> None:
        self.pages: set[int] = set()

    def map(self, flags: int, pages: int = PAGES, prot: int = RW) -> int:
        addr = _libc.mmap(None, pages * PAGE_SIZE, prot, flags, -1, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        self.pages.update(range(addr, addr + pages * PAGE_SIZE, PAGE_SIZE))
        return int(addr)

    def unmap(self, addr: int, size: int) -> None:
        """munmap, once: the range may be someone else's memory afterwards."""
        assert _libc.munmap(addr, size) == 0
        self.pages.difference_update(range(addr, addr + size, PAGE_SIZE))


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    yield h
    for page in sorted(h.pages):
        _libc.munmap(page, PAGE_SIZE)


@pytest.fixture
def stage2() -> Iterator[UcStage2]:
    s = UcStage2(Uc(UC_ARCH_X86, UC_MODE_64))
    yield s
    s.close()


def slots_of(*slots: tuple[int, int, int, int]) -> KvmMemslots:
    """A slot set of (gpa, pages, hva, flags), as KVM_SET_USER_MEMORY_REGION leaves it."""
    memslots = KvmMemslots()
    for id_, (gpa, pages, hva, flags) in enumerate(slots):
        bitmap = bytearray(8) if flags & KVM_MEM_LOG_DIRTY_PAGES else None
        memslots.slots[id_] = KvmMemorySlot(id_, 0, gpa >> 12, pages, hva, flags, bitmap)
        memslots.generation += 1
    return memslots


def perms_at(stage2: UcStage2, gpa: int) -> int:
    return next(p for lo, hi, p in stage2.uc.mem_regions() if lo <= gpa <= hi)


def test_shared_memory_is_seen_through_an_alias_of_the_same_pages(
    host: Host, stage2: UcStage2
) -> None:
    hva = host.map(SHARED)
    slots = slots_of((GPA, PAGES, hva, 0))
    stage2.load_memslots(slots)
    assert stage2.generation == slots.generation
    alias = stage2.gpa_to_hva(GPA + 0x1234)
    assert alias is not None and alias != hva + 0x1234
    stage2.uc.mem_write(GPA + 0x1234, b"guest")
    assert ctypes.string_at(hva + 0x1234, 5) == b"guest"  # the same pages, nothing copied
    assert perms_at(stage2, GPA) == UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC


def test_private_memory_is_mapped_as_it_is(host: Host, stage2: UcStage2) -> None:
    hva = host.map(PRIVATE)
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0)))
    assert stage2.gpa_to_hva(GPA + 0x10) == hva + 0x10
    assert stage2.views == {}


def test_a_readonly_slot_or_readonly_memory_is_mapped_without_write(
    host: Host, stage2: UcStage2
) -> None:
    readonly_slot = host.map(SHARED)
    readonly_memory = host.map(SHARED, prot=mmap.PROT_READ)
    stage2.load_memslots(
        slots_of(
            (GPA, PAGES, readonly_slot, KVM_MEM_READONLY), (0x40000, PAGES, readonly_memory, 0)
        )
    )
    assert perms_at(stage2, GPA) == UC_PROT_READ | UC_PROT_EXEC
    assert perms_at(stage2, 0x40000) == UC_PROT_READ | UC_PROT_EXEC


def test_a_logged_slot_lets_a_page_be_written_once_it_is_marked_dirty(
    host: Host, stage2: UcStage2
) -> None:
    hva = host.map(SHARED)
    slots = slots_of((GPA, PAGES, hva, KVM_MEM_LOG_DIRTY_PAGES))
    stage2.load_memslots(slots)
    assert perms_at(stage2, GPA + 2 * PAGE_SIZE) == UC_PROT_READ | UC_PROT_EXEC
    stage2.mark_page_dirty(GPA + 2 * PAGE_SIZE + 0x10)
    bitmap = slots.slots[0].dirty_bitmap
    assert bitmap is not None and bitmap[0] == 0b100
    assert perms_at(stage2, GPA + 2 * PAGE_SIZE) & UC_PROT_WRITE
    assert not perms_at(stage2, GPA + PAGE_SIZE) & UC_PROT_WRITE
    stage2.load_memslots(slots)  # a rebuild (KVM_GET_DIRTY_LOG's) protects every page again
    assert not perms_at(stage2, GPA + 2 * PAGE_SIZE) & UC_PROT_WRITE


def test_what_an_access_where_the_engine_has_no_memory_is(host: Host, stage2: UcStage2) -> None:
    hva = host.map(SHARED)
    host.unmap(hva + PAGE_SIZE, PAGE_SIZE)  # a hole in the slot's memory
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0)))
    assert stage2.unbacked == [(GPA + PAGE_SIZE, PAGE_SIZE)]
    assert stage2.gpa_to_hva(GPA + 2 * PAGE_SIZE) is not None  # the rest is mapped

    def access(kind: int, addr: int) -> str:
        return stage2.unmapped_access(kind, addr, 4, lambda *a: None, lambda *a: 0, lambda *a: None)

    assert access(UC_MEM_READ, GPA + PAGE_SIZE + 8) == "efault"
    assert access(UC_MEM_FETCH_UNMAPPED, 0x80000) == "fetch"
    assert access(UC_MEM_READ, 0x80FFE) == "mmio"  # it straddles two pages: both are MMIO now
    assert sorted(stage2.mmio_pages) == [0x80000, 0x81000]
    assert stage2.uc.mem_read(0x80000, 4) == bytes(4)  # served by the read callback
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0)))
    assert stage2.mmio_pages == {}  # a rebuild starts from the slots again


def test_memory_the_program_unmapped_is_noticed_and_the_alias_keeps_the_pages(
    host: Host, stage2: UcStage2
) -> None:
    hva = host.map(SHARED)
    ctypes.memmove(hva, b"kept", 4)
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0)))
    assert stage2.backing_intact()
    host.unmap(hva, PAGES * PAGE_SIZE)
    assert not stage2.backing_intact()
    assert stage2.uc.mem_read(GPA, 4) == b"kept"  # no dangling pointer in the engine


def mappings_of(addr: int) -> int:
    """How many mappings in this process show the shared memory that `addr` lies in."""
    with open("/proc/self/maps") as maps:
        lines = [line.split() for line in maps]
    inode = next(
        f[4] for f in lines if int(f[0].split("-")[0], 16) <= addr < int(f[0].split("-")[1], 16)
    )
    return sum(f[4] == inode for f in lines)


def test_unchanged_slots_keep_their_mapping_and_a_dropped_one_its_alias(
    host: Host, stage2: UcStage2
) -> None:
    hva, other = host.map(SHARED), host.map(SHARED)
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0)))
    views = dict(stage2.views)
    assert mappings_of(hva) == 2  # the program's and the engine's alias
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0), (0x40000, PAGES, other, 0)))
    assert {k: v for k, v in stage2.views.items() if k in views} == views
    stage2.load_memslots(slots_of((0x40000, PAGES, other, 0)))  # only `other`, as slot 0
    assert mappings_of(hva) == 1
    assert mappings_of(other) == 2


def test_code_the_host_rewrote_runs_afresh(host: Host, stage2: UcStage2) -> None:
    hva = host.map(SHARED)
    ctypes.memmove(hva, bytes.fromhex("b001f4"), 3)  # mov al, 1 / hlt
    stage2.load_memslots(slots_of((GPA, PAGES, hva, 0)))
    uc = stage2.uc
    uc.emu_start(GPA, 0, count=2)
    stage2.remember_code_page(GPA)
    ctypes.memmove(hva + 1, b"\x02", 1)  # the program rewrites the immediate behind Unicorn
    uc.emu_start(GPA, 0, count=2)
    assert uc.reg_read(UC_X86_REG_RAX) & 0xFF == 1  # the old translation ran
    stage2.invalidate_stale_code()
    uc.emu_start(GPA, 0, count=2)
    assert uc.reg_read(UC_X86_REG_RAX) & 0xFF == 2


def test_close_unmaps_the_aliases(host: Host) -> None:
    stage2 = UcStage2(Uc(UC_ARCH_X86, UC_MODE_64))
    stage2.load_memslots(slots_of((GPA, PAGES, host.map(SHARED), 0)))
    (alias,) = stage2.views.values()
    assert is_mapped(*alias)
    stage2.close()
    assert not is_mapped(*alias)


@pytest.mark.parametrize("vcpu_class", [x86_uc.UcVcpu, hyp.UcVcpu], ids=["x86", "arm64"])
def test_a_closed_vcpu_frees_its_engine_at_once(vcpu_class: type) -> None:
    """Not at the next garbage collection: the binding's hooks keep the engine in a cycle."""
    gc.disable()
    try:
        vcpu = vcpu_class()
        handle = vcpu.uc._uch
        assert handle
        vcpu.close()
        assert not handle  # uc_close ran, and the handle is zeroed in place
        with pytest.raises(RuntimeError, match="closed"):
            x86_uc.engine_address(vcpu.uc)
        vcpu.close()  # a second close does nothing
    finally:
        gc.enable()
    gc.collect()  # and the binding's own finalizer does not close it twice
