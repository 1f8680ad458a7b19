"""Boot helpers: put a vCPU in real, 32-bit protected or 64-bit long mode, as a loader would.

A real loader (a BIOS, GRUB, Firecracker's `configure_segments_and_sregs`) writes a GDT and,
for long mode, page tables into guest memory, then loads segment registers from those
descriptors; KVM_SET_SREGS takes the *hidden* parts of the segments, so they are computed
here from the very descriptors written to memory and stay consistent with what the guest
would load itself. Layout (Firecracker's): GDT at 0x500, PML4 at 0x9000, PDPT at 0xa000,
four page directories at 0xb000-0xefff identity-mapping the first 4 GiB with 2 MiB pages.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from kvmlab.uapi import (
    X86_CR0_ET,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    X86_EFER_LME,
    X86_RFLAGS_FIXED,
    kvm_regs,
    kvm_segment,
    kvm_sregs,
)

Writer = Callable[[int, bytes], None]  # write(gpa, data): how a loader puts bytes in guest RAM

BOOT_GDT_ADDR = 0x500
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
PD_COUNT = 4  # page directories: 4 x 1 GiB identity-mapped
BOOT_STACK = 0x8FF0
MODES = ("real", "protected", "long")

# GDT descriptor flags as Firecracker writes them: (G, D/B, L, AVL) << 12 | access byte
CODE32_FLAGS = 0xC09B  # 4 KiB granular, 32-bit, present ring-0 code, execute/read, accessed
CODE64_FLAGS = 0xA09B  # 4 KiB granular, long mode (L=1, D=0) code
DATA_FLAGS = 0xC093  # 4 KiB granular, 32-bit, present ring-0 data, read/write, accessed
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
PTE_PRESENT_RW = 0x3
PDE_LARGE = 0x80


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor (8 bytes as an int): base, 20-bit limit, access byte and flags."""
    return (
        ((base & 0xFF000000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
        | ((limit & 0x000F0000) << 32)
        | ((flags & 0x0000F0FF) << 40)
    )


def segment_from_gdt(entry: int, selector: int) -> kvm_segment:
    """The hidden segment state a CPU loads from descriptor `entry` (what `mov ds, ax` does)."""
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    present = (entry >> 47) & 1
    return kvm_segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=present,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if present else 1,
    )


def write_gdt(write: Writer, code_flags: int, gdt_addr: int = BOOT_GDT_ADDR) -> list[int]:
    """Write a null, a flat code (0x08) and a flat data (0x10) descriptor; return the entries."""
    entries = [0, gdt_entry(code_flags, 0, 0xFFFFF), gdt_entry(DATA_FLAGS, 0, 0xFFFFF)]
    write(gdt_addr, struct.pack(f"<{len(entries)}Q", *entries))
    return entries


def write_identity_page_tables(write: Writer, pml4_addr: int = PML4_ADDR) -> None:
    """PML4[0] -> PDPT; PDPT[0..3] -> four PDs of 512 2 MiB pages: the first 4 GiB, 1:1."""
    pdpt, pd = pml4_addr + 0x1000, pml4_addr + 0x2000
    write(pml4_addr, struct.pack("<Q", pdpt | PTE_PRESENT_RW) + bytes(0xFF8))
    pdpt_entries = [pd + 0x1000 * i | PTE_PRESENT_RW for i in range(PD_COUNT)]
    write(pdpt, struct.pack(f"<{PD_COUNT}Q", *pdpt_entries) + bytes(0x1000 - 8 * PD_COUNT))
    pdes = [(i << 21) | PDE_LARGE | PTE_PRESENT_RW for i in range(512 * PD_COUNT)]
    write(pd, struct.pack(f"<{len(pdes)}Q", *pdes))


def _load_segments(sregs: kvm_sregs, entries: list[int], gdt_addr: int) -> None:
    sregs.gdt.base, sregs.gdt.limit = gdt_addr, 8 * len(entries) - 1
    sregs.cs = segment_from_gdt(entries[1], CODE_SELECTOR)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, segment_from_gdt(entries[2], DATA_SELECTOR))


def setup_real_mode(regs: kvm_regs, sregs: kvm_sregs, entry: int, stack: int = BOOT_STACK) -> None:
    """Real mode at physical `entry`: CS base/selector cover it, rip is the offset in CS."""
    base = entry & 0xF0000
    sregs.cs.selector, sregs.cs.base = base >> 4, base
    for name in ("ds", "es", "ss"):
        seg = getattr(sregs, name)
        seg.selector, seg.base = 0, 0
    regs.rip, regs.rsp, regs.rflags = entry - base, stack, X86_RFLAGS_FIXED


def setup_protected_mode(
    write: Writer,
    regs: kvm_regs,
    sregs: kvm_sregs,
    entry: int,
    stack: int = BOOT_STACK,
    gdt_addr: int = BOOT_GDT_ADDR,
) -> None:
    """32-bit protected mode, flat 4 GiB segments from a GDT in guest memory, no paging."""
    _load_segments(sregs, write_gdt(write, CODE32_FLAGS, gdt_addr), gdt_addr)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr4 &= ~X86_CR4_PAE
    sregs.efer &= ~(X86_EFER_LME | X86_EFER_LMA)
    regs.rip, regs.rsp, regs.rflags = entry, stack, X86_RFLAGS_FIXED


def setup_long_mode(
    write: Writer,
    regs: kvm_regs,
    sregs: kvm_sregs,
    entry: int,
    stack: int = BOOT_STACK,
    gdt_addr: int = BOOT_GDT_ADDR,
    pml4_addr: int = PML4_ADDR,
) -> None:
    """64-bit long mode: identity-mapped page tables, CR0.PG/PE, CR4.PAE, EFER.LME/LMA."""
    _load_segments(sregs, write_gdt(write, CODE64_FLAGS, gdt_addr), gdt_addr)
    write_identity_page_tables(write, pml4_addr)
    sregs.cr3 = pml4_addr
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.efer |= X86_EFER_LME | X86_EFER_LMA
    regs.rip, regs.rsp, regs.rflags = entry, stack, X86_RFLAGS_FIXED


def setup_mode(
    write: Writer, regs: kvm_regs, sregs: kvm_sregs, mode: str, entry: int, stack: int
) -> None:
    """Dispatch on `mode`: "real", "protected" or "long"."""
    if mode == "real":
        setup_real_mode(regs, sregs, entry, stack)
    elif mode == "protected":
        setup_protected_mode(write, regs, sregs, entry, stack)
    elif mode == "long":
        setup_long_mode(write, regs, sregs, entry, stack)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
