"""QEMU's `-kernel` for multiboot (v1) kernels: find the header, load the image, write the
multiboot information, and enter it in 32-bit protected mode.

What a kernel finds is what QEMU's loader and its multiboot option ROM give it: the kernel's
ELF segments at their physical addresses (or, with the a.out kludge, the file range the header
names), the bss zeroed, EAX = 0x2BADB002, EBX = the information block at 0x9500, a memory map
at 0x9000 in the BIOS's e820 form, and the command line "IMAGE ARGS" with the loader's name in
the page after the kernel. Paging is off, segments are flat, interrupts are disabled.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/i386/multiboot.c
https://gitlab.com/qemu-project/qemu/-/blob/master/pc-bios/optionrom/multiboot.S
https://www.gnu.org/software/grub/manual/multiboot/multiboot.html
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmlab.vmm.boot import Writer

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192  # the header lies, 4-byte aligned, in the image's first 8 KiB
MULTIBOOT_HEADER_SIZE = 48  # twelve 32-bit fields: magic, flags, checksum, addresses, video
MULTIBOOT_VIDEO_MODE = 1 << 2  # header flag: wants a graphics mode (not given, as in QEMU)
MULTIBOOT_AOUT_KLUDGE = 1 << 16  # header flag: load by the header's addresses, not ELF

# Where QEMU puts the information (MULTIBOOT_STRUCT_ADDR: below 1 MiB for its real-mode ROM)
MULTIBOOT_STRUCT_ADDR = 0x9000
ADDR_E820_MAP = MULTIBOOT_STRUCT_ADDR
ADDR_MBI = ADDR_E820_MAP + 0x500
MBI_SIZE = 88

# multiboot_info flags: which fields are valid (QEMU sets these six)
MULTIBOOT_INFO_MEMORY = 1 << 0
MULTIBOOT_INFO_BOOTDEV = 1 << 1
MULTIBOOT_INFO_CMDLINE = 1 << 2
MULTIBOOT_INFO_MODS = 1 << 3
MULTIBOOT_INFO_MEM_MAP = 1 << 6
MULTIBOOT_INFO_BOOT_LOADER_NAME = 1 << 9
MBI_FLAGS = (
    MULTIBOOT_INFO_MEMORY
    | MULTIBOOT_INFO_BOOTDEV
    | MULTIBOOT_INFO_CMDLINE
    | MULTIBOOT_INFO_MODS
    | MULTIBOOT_INFO_MEM_MAP
    | MULTIBOOT_INFO_BOOT_LOADER_NAME
)
MBI_BOOT_DEVICE = 0x8000FFFF  # "first BIOS disk, no partition", as QEMU says
BOOTLOADER_NAME = "kvmlab"

E820_RAM, E820_RESERVED = 1, 2
EBDA_START = 0x9FC00  # the BIOS keeps the last KiB below 640 KiB (int 0x12 says 639)
BIOS_AREA = 0xF0000  # the BIOS's 64 KiB below 1 MiB
HIGH_MEMORY = 0x100000  # 1 MiB: where kernels load and mem_upper counts from
PAGE_SIZE = 0x1000

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64, ELFDATA2LSB = 1, 2, 1
EM_386, EM_X86_64 = 3, 62
ET_EXEC = 2
PT_LOAD = 1


class MultibootError(ValueError):
    """The image cannot be booted as a multiboot kernel; the message says why."""


@dataclass(frozen=True)
class MultibootHeader:
    """The header found in the image: where it is, its flags and the a.out-kludge addresses."""

    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class Segment:
    """Bytes to place at guest-physical `gpa`, followed by `memsz - len(data)` zero bytes."""

    gpa: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class KernelImage:
    """A parsed kernel: its header, its segments and its physical entry point."""

    header: MultibootHeader
    segments: list[Segment]
    entry: int

    @property
    def low(self) -> int:
        return min(s.gpa for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.gpa + s.memsz for s in self.segments)


def find_header(image: bytes) -> MultibootHeader | None:
    """The first valid multiboot header (magic + flags + checksum == 0 mod 2^32), if any."""
    end = min(len(image), MULTIBOOT_SEARCH) - 12
    for offset in range(0, end + 1, 4):
        magic, flags, checksum = struct.unpack_from("<3I", image, offset)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & MULTIBOOT_AOUT_KLUDGE:
                if offset + 32 > len(image):
                    raise MultibootError("the multiboot header is cut off (a.out kludge fields)")
                fields = struct.unpack_from("<5I", image, offset + 12)
                return MultibootHeader(offset, flags, *fields)
            return MultibootHeader(offset, flags)
    return None


def parse_kernel(image: bytes) -> KernelImage:
    """Find the header and work out what to load where, as QEMU's load_multiboot does."""
    header = find_header(image)
    if header is None:
        raise MultibootError(
            f"not a multiboot kernel: no multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x} "
            f"with a valid checksum) in the first {MULTIBOOT_SEARCH // 1024} KiB"
        )
    if header.flags & MULTIBOOT_AOUT_KLUDGE:
        segments, entry = _aout_kludge(image, header)
    else:
        segments, entry = _elf32_segments(image)
    if not segments:
        raise MultibootError("the kernel has nothing to load (no PT_LOAD segment)")
    return KernelImage(header, segments, entry)


def _aout_kludge(image: bytes, h: MultibootHeader) -> tuple[list[Segment], int]:
    """Flag 16: the file from the header back to load_addr is loaded at load_addr."""
    if h.header_addr < h.load_addr:
        raise MultibootError("invalid multiboot header: header_addr is below load_addr")
    if h.header_addr - h.load_addr > h.offset:
        raise MultibootError("invalid multiboot header: header_addr lies before the file")
    text_offset = h.offset - (h.header_addr - h.load_addr)
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise MultibootError("invalid multiboot header: load_end_addr is below load_addr")
        load_size = h.load_end_addr - h.load_addr
    else:
        load_size = len(image) - text_offset
    if text_offset + load_size > len(image):
        raise MultibootError(
            f"the multiboot header asks for {load_size:#x} bytes from file offset "
            f"{text_offset:#x}, but the file has {len(image):#x}"
        )
    memsz = load_size
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + load_size:
            raise MultibootError("invalid multiboot header: bss_end_addr is below load_end_addr")
        memsz = h.bss_end_addr - h.load_addr
    data = image[text_offset : text_offset + load_size]
    return [Segment(h.load_addr, data, memsz)], h.entry_addr


def _elf32_segments(image: bytes) -> tuple[list[Segment], int]:
    """The PT_LOAD segments of a 32-bit x86 ELF at their physical addresses, and the entry."""
    if image[:4] != ELF_MAGIC:
        raise MultibootError("the multiboot header has no a.out kludge and the file is not ELF")
    if len(image) < 52:
        raise MultibootError("the ELF header is cut off")
    if image[4] == ELFCLASS64 or struct.unpack_from("<H", image, 18)[0] == EM_X86_64:
        raise MultibootError("cannot load an x86-64 ELF image as multiboot: give a 32-bit one")
    if image[4] != ELFCLASS32 or image[5] != ELFDATA2LSB:
        raise MultibootError("not a 32-bit little-endian ELF file")
    e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIII", image, 16)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 42)
    if e_machine != EM_386 or e_type != ET_EXEC:
        raise MultibootError(f"not an i386 executable (e_type {e_type}, e_machine {e_machine})")
    if e_phentsize < 32 or e_phoff + e_phnum * e_phentsize > len(image):
        raise MultibootError("the ELF program headers lie outside the file")
    segments: list[Segment] = []
    entry = e_entry
    for i in range(e_phnum):
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<6I", image, e_phoff + i * e_phentsize
        )
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(image):
            raise MultibootError(f"ELF segment {i} lies outside the file")
        segments.append(Segment(p_paddr, image[p_offset : p_offset + p_filesz], p_memsz))
        if p_vaddr <= e_entry < p_vaddr + p_memsz:  # a higher-half kernel: its physical entry
            entry = p_paddr + (e_entry - p_vaddr)
    return segments, entry


def e820_map(ram_size: int) -> list[tuple[int, int, int]]:
    """The PC's memory map as a BIOS reports it: (address, length, type) for RAM at 0."""
    return [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        (BIOS_AREA, HIGH_MEMORY - BIOS_AREA, E820_RESERVED),
        (HIGH_MEMORY, ram_size - HIGH_MEMORY, E820_RAM),
    ]


def _page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def load_multiboot(write: Writer, image: bytes, ram_size: int, name: str, cmdline: str) -> int:
    """Load the kernel and its multiboot information with `write`; return the entry point.

    `name` is the image's path as given (QEMU passes "NAME CMDLINE" as the command line).
    MultibootError if the image is not a bootable multiboot kernel for `ram_size` bytes of RAM.
    """
    kernel = parse_kernel(image)
    for s in kernel.segments:
        if s.gpa < HIGH_MEMORY or s.gpa + s.memsz > ram_size:
            raise MultibootError(
                f"a kernel segment at {s.gpa:#x}-{s.gpa + s.memsz - 1:#x} lies outside the "
                f"RAM a kernel may load into ({HIGH_MEMORY:#x}-{ram_size - 1:#x})"
            )
    # After the kernel, page-aligned: (no module list,) the command line, the loader's name.
    info_addr = kernel.low + _page_align(kernel.high - kernel.low)
    cmdline_bytes = f"{name} {cmdline}".encode() + b"\0"
    loader_bytes = BOOTLOADER_NAME.encode() + b"\0"
    if info_addr + len(cmdline_bytes) + len(loader_bytes) > ram_size:
        raise MultibootError("no room in RAM after the kernel for its command line")
    for s in kernel.segments:
        write(s.gpa, s.data + bytes(s.memsz - len(s.data)))
    write(info_addr, cmdline_bytes + loader_bytes)

    entries = e820_map(ram_size)
    mmap = b"".join(struct.pack("<IQQI", 20, addr, length, kind) for addr, length, kind in entries)
    write(ADDR_E820_MAP, mmap)
    mem_upper = next(length for addr, length, kind in entries if addr == HIGH_MEMORY) // 1024
    mbi = bytearray(MBI_SIZE)
    mem_lower = EBDA_START // 1024
    struct.pack_into("<5I", mbi, 0, MBI_FLAGS, mem_lower, mem_upper, MBI_BOOT_DEVICE, info_addr)
    struct.pack_into("<2I", mbi, 20, 0, info_addr)  # mods_count, mods_addr (an empty list)
    struct.pack_into("<2I", mbi, 44, len(mmap), ADDR_E820_MAP)
    struct.pack_into("<I", mbi, 64, info_addr + len(cmdline_bytes))
    write(ADDR_MBI, bytes(mbi))
    return kernel.entry


def boot_stub(entry: int, info: int = ADDR_MBI) -> bytes:
    """The last steps of QEMU's multiboot ROM, as 32-bit code: EAX = the bootloader magic,
    EBX = the information block, jump to the kernel's entry (mov eax/ebx/ecx; jmp ecx)."""
    return (
        b"\xb8" + struct.pack("<I", MULTIBOOT_BOOTLOADER_MAGIC)
        + b"\xbb" + struct.pack("<I", info)
        + b"\xb9" + struct.pack("<I", entry)
        + b"\xff\xe1"
    )  # fmt: skip
