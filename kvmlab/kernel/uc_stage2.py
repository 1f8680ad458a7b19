"""A vCPU's guest-physical memory as its Unicorn engine sees it: kvmlab's EPT / stage-2 tables.

On hardware, KVM gives the CPU a second level of page tables built from the VM's memslots (EPT
on Intel, stage 2 on arm64): guest-physical to host memory, with permissions. An access the
tables do not allow leaves the guest, and KVM maps the page, logs it dirty, or emulates MMIO.
Unicorn has one flat "physical" address space per engine instead; `UcStage2` keeps it in step
with the slots, the same way for both architectures (x86/uc.py and arm64/hyp.py each own one):

- a slot's host memory is handed over with `mem_map_ptr`, never copied, one piece per host
  mapping; a piece with no readable memory behind it is left out, and an access there fails
  with EFAULT, as KVM fails to fault the page in;
- MAP_SHARED memory is mapped through an alias of the same pages (mremap with old_size 0), so
  that the program's munmap cannot pull pages from under a running guest; MAP_PRIVATE memory
  cannot be aliased and is mapped as it is;
- a KVM_MEM_READONLY slot (or read-only host memory) is mapped without write permission, and a
  dirty-logged slot is write-protected until each page's first store (`mark_page_dirty`);
- a guest page with no slot becomes an MMIO page on its first access (KVM's MMIO SPTEs);
- `generation` is the memslots generation the map was built from: a vCPU rebuilds it before
  entering the guest when the slots changed, as KVM zaps and refaults its tables;
- Unicorn keeps translated code, which hardware does not: pages it translated are remembered
  with their bytes and dropped from its cache when the host rewrote them.

https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/mmu/mmu.c (x86's tables)
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/mmu.c (arm64's stage 2)
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from unicorn import (
    UC_CTL_IO_WRITE,
    UC_CTL_TB_FLUSH,
    UC_CTL_TLB_FLUSH,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_MEM_FETCH_UNMAPPED,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
)

from kvmlab.kernel.memslots import PAGE_SHIFT, PAGE_SIZE, KvmMemslots
from kvmlab.kernel.uaccess import user_range_pieces

PAGE_MASK = ~(PAGE_SIZE - 1) & (2**64 - 1)
MS_ASYNC = 1
MREMAP_MAYMOVE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
_msync = _libc.msync
_msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mremap = _libc.mremap
_mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
_mremap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value

# An MMIO page's callbacks: a hook that sees each whole access, and Unicorn's read and write
# handlers of the page (which get the page's address as their user data).
MmioHook = Callable[[Uc, int, int, int, int, Any], None]
MmioRead = Callable[[Uc, int, int, int], int]
MmioWrite = Callable[[Uc, int, int, int, int], None]
UnmappedAccess = Literal["fetch", "efault", "mmio"]


def alias_shared_pages(hva: int, size: int) -> int | None:
    """A second mapping of the shared pages at `hva` (mremap with old_size 0), or None.

    Unicorn dereferences guest memory directly. Through an alias of its own, the program's
    munmap of the memory behind a slot while a vCPU is in the guest cannot pull the pages
    from under the engine (the guest keeps them until it next leaves, then sees them gone);
    the pages are the same, nothing is copied. Private memory cannot be aliased.
    """
    addr = _mremap(hva, 0, size, MREMAP_MAYMOVE)
    return None if addr in (None, MAP_FAILED) else int(addr)


def _unmap_views(views: dict[tuple[int, int], tuple[int, int]]) -> None:
    for addr, size in views.values():
        _munmap(addr, size)
    views.clear()


@dataclass(slots=True, frozen=True)
class MappedPiece:
    """A run of one slot backed by one host mapping, as it is mapped into the engine."""

    gpa: int
    size: int
    hva: int
    perms: int
    logged: bool  # dirty logging: write-protected until each page's first store
    shared: bool  # a MAP_SHARED mapping: the engine gets an alias of the pages


class UcStage2:
    """The guest-physical map of one vCPU's engine, rebuilt from the memslots when they change."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self.slots = KvmMemslots()
        self.generation = -1  # no slots loaded yet
        self.mapped: dict[tuple[int, int], MappedPiece] = {}  # (slot id, offset): a piece
        self.views: dict[tuple[int, int], tuple[int, int]] = {}  # piece -> its alias (addr, size)
        weakref.finalize(self, _unmap_views, self.views)
        self.unbacked: list[tuple[int, int]] = []  # guest ranges whose host memory is missing
        self.mmio_pages: dict[int, int] = {}  # guest page with no slot -> its hook handle
        self.code_pages: dict[int, tuple[int, bytes]] = {}  # gpa page -> (hva, bytes translated)

    def load_memslots(self, slots: KvmMemslots) -> None:
        """Make the engine's physical memory match the slots (only what changed is remapped)."""
        wanted: dict[tuple[int, int], MappedPiece] = {}
        unbacked = []
        for slot in slots:
            logged = slot.dirty_bitmap is not None
            for offset, size, access in user_range_pieces(slot.userspace_addr, slot.size):
                gpa = slot.gpa + offset
                if access is None or access[0] != "r":
                    unbacked.append((gpa, size))  # KVM faults it in lazily: EFAULT on use
                    continue
                perms = UC_PROT_READ | UC_PROT_EXEC
                if access[1] == "w" and not slot.readonly:
                    perms |= UC_PROT_WRITE
                hva, shared = slot.userspace_addr + offset, access[3] == "s"
                wanted[slot.id, offset] = MappedPiece(gpa, size, hva, perms, logged, shared)
        self.slots = slots
        uc = self.uc
        self._unmap_mmio_pages()
        for key, old in list(self.mapped.items()):
            if wanted.get(key) != old:
                uc.mem_unmap(old.gpa, old.size)
                del self.mapped[key]
                view = self.views.pop(key, None)
                if view is not None:
                    _munmap(*view)
        for key, new in wanted.items():
            if key not in self.mapped:
                alias = alias_shared_pages(new.hva, new.size) if new.shared else None
                uc.mem_map_ptr(new.gpa, new.size, new.perms, alias or new.hva)
                self.mapped[key] = new
                if alias is not None:
                    self.views[key] = (alias, new.size)
        for m in self.mapped.values():  # dirty logging: write-protect, note first writes
            if m.logged:
                uc.mem_protect(m.gpa, m.size, UC_PROT_READ | UC_PROT_EXEC)
        self.unbacked = unbacked
        self.generation = slots.generation
        self.flush_code()

    def _unmap_mmio_pages(self) -> None:
        if self.mmio_pages:
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        for page, handle in self.mmio_pages.items():
            self.uc.hook_del(handle)
            self.uc.mem_unmap(page, PAGE_SIZE)
        self.mmio_pages.clear()

    def backing_intact(self) -> bool:
        """Is the host memory behind every mapped piece still mapped in this process?

        Memory the program unmapped since (a closed or garbage-collected mmap) must be taken
        out of the guest's view before it runs: msync fails with ENOMEM on a range with a hole,
        and touches nothing.
        """
        # A loop rather than all() over a generator: this runs before every guest entry.
        for m in self.mapped.values():  # noqa: SIM110
            if _msync(m.hva, m.size, MS_ASYNC):
                return False
        return True

    def gpa_to_hva(self, gpa: int) -> int | None:
        """Where the engine sees guest page `gpa` (the alias, if any: it is always mapped)."""
        for key, m in self.mapped.items():
            if m.gpa <= gpa < m.gpa + m.size:
                view = self.views.get(key)
                return (view[0] if view else m.hva) + gpa - m.gpa
        return None

    def unmapped_access(
        self,
        access: int,
        addr: int,
        size: int,
        on_mmio: MmioHook,
        read: MmioRead,
        write: MmioWrite,
    ) -> UnmappedAccess:
        """An access where the engine has no memory (Unicorn's UC_HOOK_MEM_UNMAPPED): what it is.

        "fetch": nothing to execute there. "efault": a slot whose host memory is missing.
        "mmio": no slot at all; its pages are now MMIO pages, served by `read` and `write`,
        with `on_mmio` seeing each whole access. Code translated before that hook existed
        would not call it, so the access must be run again after `flush_code`.
        """
        if access == UC_MEM_FETCH_UNMAPPED:
            return "fetch"
        if any(gpa <= addr < gpa + n for gpa, n in self.unbacked):
            return "efault"
        uc = self.uc
        for page in {addr & PAGE_MASK, (addr + size - 1) & PAGE_MASK}:
            if page in self.mmio_pages or self.gpa_to_hva(page) is not None:
                continue
            uc.mmio_map(page, PAGE_SIZE, read, page, write, page)
            self.mmio_pages[page] = uc.hook_add(
                UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, on_mmio, None, page, page + PAGE_SIZE - 1
            )
        return "mmio"

    def mark_page_dirty(self, gpa: int) -> None:
        """A dirty-logged slot's first store to a page: set its bit and let the store through.

        mark_page_dirty_in_slot, then what KVM's fast page fault does to the write-protected
        entry; the store is then run again.
        https://elixir.bootlin.com/linux/v6.12/source/virt/kvm/kvm_main.c
        """
        slot = self.slots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        assert slot is not None and slot.dirty_bitmap is not None
        index = (gpa >> PAGE_SHIFT) - slot.base_gfn
        slot.dirty_bitmap[index // 8] |= 1 << (index % 8)
        self.uc.mem_protect(gpa & PAGE_MASK, PAGE_SIZE, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC)

    def remember_code_page(self, gpa: int) -> None:
        """Note that Unicorn translated code in this guest page, and what the page held."""
        page = gpa & PAGE_MASK
        if page not in self.code_pages:
            hva = self.gpa_to_hva(page)
            if hva is not None:
                self.code_pages[page] = (hva, ctypes.string_at(hva, PAGE_SIZE))

    def invalidate_stale_code(self) -> None:
        """Drop translations of guest pages the host rewrote since Unicorn translated them.

        The guest sees host stores to data at once (the memory is shared), but Unicorn keeps
        running code it translated earlier; KVM on hardware has no such cache to go stale.
        """
        for page, (hva, seen) in self.code_pages.items():
            if _memcmp(hva, seen, PAGE_SIZE):
                self.uc.ctl_remove_cache(page, page + PAGE_SIZE)
                self.code_pages[page] = (hva, ctypes.string_at(hva, PAGE_SIZE))

    def flush_code(self) -> None:
        """Drop every translation (and with them the pages remembered as code)."""
        self.code_pages.clear()
        self.uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)

    def close(self) -> None:
        """The engine is gone or never runs again: unmap the aliases, forget the rest."""
        _unmap_views(self.views)
        self.mapped.clear()
        self.mmio_pages.clear()
        self.code_pages.clear()
