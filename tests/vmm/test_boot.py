"""Boot helpers: descriptors, page tables and the register state of each CPU mode."""

from __future__ import annotations

import struct

from kvmlab.uapi import (
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    X86_EFER_LME,
    kvm_regs,
    kvm_sregs,
)
from kvmlab.vmm.boot import (
    BOOT_GDT_ADDR,
    CODE32_FLAGS,
    CODE64_FLAGS,
    DATA_FLAGS,
    PML4_ADDR,
    gdt_entry,
    segment_from_gdt,
    setup_long_mode,
    setup_protected_mode,
    setup_real_mode,
)


class Ram:
    """A writer over a bytearray, as guest RAM at GPA 0."""

    def __init__(self, size: int = 0x10000) -> None:
        self.mem = bytearray(size)

    def __call__(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def u64(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, gpa)[0])


def test_flat_descriptors_have_the_well_known_encodings() -> None:
    assert gdt_entry(CODE32_FLAGS, 0, 0xFFFFF) == 0x00CF9B000000FFFF
    assert gdt_entry(DATA_FLAGS, 0, 0xFFFFF) == 0x00CF93000000FFFF
    assert gdt_entry(CODE64_FLAGS, 0, 0xFFFFF) == 0x00AF9B000000FFFF


def test_a_segment_loaded_from_a_flat_code_descriptor_spans_4_gib() -> None:
    seg = segment_from_gdt(gdt_entry(CODE32_FLAGS, 0, 0xFFFFF), 0x08)
    assert (seg.base, seg.limit, seg.selector, seg.type) == (0, 0xFFFFFFFF, 0x08, 0xB)
    assert (seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.unusable) == (
        1,
        0,
        1,
        1,
        0,
        1,
        0,
    )


def test_base_and_limit_survive_the_descriptor_round_trip() -> None:
    seg = segment_from_gdt(gdt_entry(0x0093, 0x12345678, 0xABCDE), 0x10)
    assert (seg.base, seg.limit, seg.g) == (0x12345678, 0xABCDE, 0)


def test_real_mode_puts_cs_at_the_64k_block_holding_the_entry() -> None:
    regs, sregs = kvm_regs(), kvm_sregs()
    setup_real_mode(regs, sregs, 0x1000)
    assert (sregs.cs.selector, sregs.cs.base, regs.rip, regs.rflags) == (0, 0, 0x1000, 2)
    setup_real_mode(regs, sregs, 0x12345)
    assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (0x1000, 0x10000, 0x2345)


def test_protected_mode_sregs_match_the_gdt_written_to_memory() -> None:
    ram, regs, sregs = Ram(), kvm_regs(), kvm_sregs()
    setup_protected_mode(ram, regs, sregs, 0x1000, stack=0x8000)
    gdt = [ram.u64(BOOT_GDT_ADDR + 8 * i) for i in range(3)]
    assert gdt[0] == 0
    assert (sregs.gdt.base, sregs.gdt.limit) == (BOOT_GDT_ADDR, 23)
    assert bytes(sregs.cs) == bytes(segment_from_gdt(gdt[1], 0x08))
    for name in ("ds", "es", "fs", "gs", "ss"):
        assert bytes(getattr(sregs, name)) == bytes(segment_from_gdt(gdt[2], 0x10))
    assert sregs.cr0 & (X86_CR0_PE | X86_CR0_PG) == X86_CR0_PE
    assert (regs.rip, regs.rsp) == (0x1000, 0x8000)


def test_long_mode_identity_maps_4_gib_with_2_mib_pages() -> None:
    ram, regs, sregs = Ram(), kvm_regs(), kvm_sregs()
    setup_long_mode(ram, regs, sregs, 0x1000)
    pdpt = ram.u64(PML4_ADDR) & ~0xFFF
    pds = [ram.u64(pdpt + 8 * i) & ~0xFFF for i in range(4)]
    assert ram.u64(pdpt + 8 * 4) == 0
    for gib, pd in enumerate(pds):
        for i in (0, 1, 511):
            assert ram.u64(pd + 8 * i) == ((gib << 30) | (i << 21) | 0x83)


def test_long_mode_sregs_enable_paging_pae_lme_and_a_64_bit_code_segment() -> None:
    ram, regs, sregs = Ram(), kvm_regs(), kvm_sregs()
    setup_long_mode(ram, regs, sregs, 0x1000)
    assert sregs.cr3 == PML4_ADDR
    assert sregs.cr0 & (X86_CR0_PE | X86_CR0_PG) == X86_CR0_PE | X86_CR0_PG
    assert sregs.cr4 & X86_CR4_PAE
    assert sregs.efer & (X86_EFER_LME | X86_EFER_LMA) == X86_EFER_LME | X86_EFER_LMA
    assert (sregs.cs.l, sregs.cs.db, sregs.cs.selector) == (1, 0, 0x08)
    assert bytes(sregs.cs) == bytes(segment_from_gdt(ram.u64(BOOT_GDT_ADDR + 8), 0x08))
