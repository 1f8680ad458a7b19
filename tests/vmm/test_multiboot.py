"""QEMU's -kernel on kvmlab: the multiboot loader, the PC devices kernels probe, and kernels
built here from C and assembly booting identically on the simulator and the host."""

from __future__ import annotations

import struct
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_backend

from kvmlab import sys as sim
from kvmlab.vmm import EXCP_HLT
from kvmlab.vmm.cpu_model import FEAT_1_ECX, FEAT_1_EDX, KVMLAB64, X86CPUDefinition
from kvmlab.vmm.hw.fw_cfg import (
    FW_CFG_FILE_DIR,
    FW_CFG_ID,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FwCfgIo,
)
from kvmlab.vmm.hw.lapic_regs import APIC_ID, APIC_LVR, APIC_SPIV, LocalApicRegisters
from kvmlab.vmm.multiboot import (
    ADDR_E820_MAP,
    ADDR_MBI,
    MULTIBOOT_AOUT_KLUDGE,
    MULTIBOOT_HEADER_MAGIC,
    MultibootError,
    find_header,
    load_multiboot,
    parse_kernel,
)
from kvmlab.vmm.pc import PC, pc_boot_kernel

MB = 1 << 20
LEAF_1 = "cpuid 00000001: "


def boot(
    k: ModuleType,
    image: Path,
    cmdline: str = "",
    cpu_model: X86CPUDefinition | None = KVMLAB64,
    **kwargs: int,
) -> tuple[str, int | None]:
    """Boot `image` on a PC; its serial output and its isa-debug-exit code."""
    with pc_boot_kernel(
        image.read_bytes(), k, name=image.name, cmdline=cmdline, cpu_model=cpu_model, **kwargs
    ) as pc:
        pc.run(max_exits=100_000)
        return pc.serial.text(), pc.exit_code


def without_pvm_extensions(text: str) -> list[str]:
    """The kernel's lines with leaf 1's ECX and EDX cut to the model's bits: the host's KVM
    (PVM) adds its CPU's extensions there, whatever the table says (docs/kernel.md)."""
    lines = []
    for line in text.splitlines():
        if line.startswith(LEAF_1):
            eax, ebx, ecx, edx = (int(word, 16) for word in line[len(LEAF_1) :].split())
            ecx &= KVMLAB64.features[FEAT_1_ECX]
            edx &= KVMLAB64.features[FEAT_1_EDX]
            line = f"{LEAF_1}{eax:08x} {ebx:08x} {ecx:08x} {edx:08x}"
        lines.append(line)
    return lines


def header(flags: int, *fields: int) -> bytes:
    return struct.pack(f"<3I{len(fields)}I", MULTIBOOT_HEADER_MAGIC, flags,
                       -(MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFFFFFF, *fields)  # fmt: skip


def aout_image(load_addr: int = MB, body: bytes = b"\xf4", bss: int = 0x100) -> bytes:
    """header at file offset 0 = load_addr; code right after it; bss after the code."""
    end = load_addr + 32 + len(body)
    return (
        header(MULTIBOOT_AOUT_KLUDGE, load_addr, load_addr, end, end + bss, load_addr + 32) + body
    )


# --- the loader ------------------------------------------------------------------------------


def test_the_header_is_found_only_with_a_valid_checksum_in_the_first_8k() -> None:
    assert find_header(bytes(64) + header(0)) is not None
    assert find_header(bytes(64) + header(0)[:8] + b"\0\0\0\0") is None  # bad checksum
    assert find_header(bytes(8192) + header(0)) is None  # too far
    assert find_header(bytes(2) + header(0)) is None  # not 4-byte aligned
    with pytest.raises(MultibootError, match="no multiboot header"):
        parse_kernel(b"\x7fELF" + bytes(100))


def test_the_aout_kludge_loads_by_the_headers_addresses_and_zeroes_the_bss() -> None:
    kernel = parse_kernel(aout_image())
    (segment,) = kernel.segments
    assert (segment.gpa, segment.memsz, kernel.entry) == (MB, 33 + 0x100, MB + 32)
    assert segment.data == aout_image()


def test_an_elf64_kernel_is_refused_as_qemu_does() -> None:
    elf64 = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 62) + bytes(44) + header(0)
    with pytest.raises(MultibootError, match="x86-64"):
        parse_kernel(elf64)


@pytest.mark.parametrize(
    "image, message",
    [
        (aout_image(load_addr=0x10000000), "outside the RAM"),
        (aout_image(load_addr=0x8000), "outside the RAM"),  # below 1 MiB
        (header(MULTIBOOT_AOUT_KLUDGE, MB + 64, MB, 0, 0, MB), "before the file"),
        (header(MULTIBOOT_AOUT_KLUDGE, MB, MB, MB + 4096, 0, MB), "file has"),
        (header(0) + bytes(16), "not ELF"),
    ],
)
def test_bad_kernels_are_refused_with_a_reason(image: bytes, message: str) -> None:
    with pytest.raises(MultibootError, match=message):
        load_multiboot(lambda gpa, data: None, image, 128 * MB, "k", "")


def test_the_information_block_is_where_qemu_puts_it() -> None:
    memory: dict[int, bytes] = {}
    entry = load_multiboot(memory.__setitem__, aout_image(), 64 * MB, "k", "a b")
    assert entry == MB + 32
    flags, lower, upper, _, cmdline = struct.unpack_from("<5I", memory[ADDR_MBI])
    mmap_length, mmap_addr = struct.unpack_from("<2I", memory[ADDR_MBI], 44)
    assert (flags, lower, upper) == (0x24F, 639, 63 * 1024)
    assert (mmap_addr, mmap_length) == (ADDR_E820_MAP, 4 * 24)
    assert cmdline == MB + 0x1000  # the page after the kernel
    assert memory[cmdline] == b"k a b\0kvmlab\0"
    assert memory[MB] == aout_image() + bytes(0x100)  # bss zeroed


# --- the devices -----------------------------------------------------------------------------


def read_item(fw: FwCfgIo, key: int, n: int) -> bytes:
    fw.write(0, 2, key)
    return bytes(fw.read(1, 1) for _ in range(n))


def test_fw_cfg_answers_the_signature_and_items_and_zeroes_past_their_end() -> None:
    fw = FwCfgIo()
    fw.fw_cfg_add_i64(FW_CFG_RAM_SIZE, 64 * MB)
    assert read_item(fw, FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert read_item(fw, FW_CFG_ID, 4) == b"\1\0\0\0"
    assert read_item(fw, FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", 64 * MB)
    assert read_item(fw, 0x1234, 2) == b"\0\0"  # no such item
    fw.write(1, 1, 0x55)  # a data write is ignored
    assert read_item(fw, FW_CFG_SIGNATURE, 1) == b"Q"


def test_fw_cfg_files_are_listed_sorted_with_their_selectors() -> None:
    fw = FwCfgIo()
    assert fw.fw_cfg_add_file("etc/z", b"zz") == 0x20
    assert fw.fw_cfg_add_file("etc/a", b"a") == 0x20  # sorted: "etc/z" moves to 0x21
    directory = read_item(fw, FW_CFG_FILE_DIR, 4 + 2 * 64)
    assert struct.unpack_from(">I", directory)[0] == 2
    assert struct.unpack_from(">IHH", directory, 4) == (1, 0x20, 0)
    assert directory[12:17] == b"etc/a" and struct.unpack_from(">IH", directory, 68) == (2, 0x21)
    assert read_item(fw, 0x21, 2) == b"zz"


def test_the_apic_page_answers_id_and_version_per_cpu_and_keeps_writes() -> None:
    cpu = [0]
    lapic = LocalApicRegisters(lambda: cpu[0])
    assert (lapic.read(APIC_ID, 4), lapic.read(APIC_LVR, 4)) == (0, 0x50014)
    assert lapic.read(APIC_LVR + 2, 1) == 5  # the max-LVT byte
    lapic.write(APIC_SPIV, 4, 0x1FF)
    cpu[0] = 1
    assert lapic.read(APIC_ID, 4) == 1 << 24
    assert lapic.read(APIC_SPIV, 4) == 0xFF  # vCPU 1's register still has its reset value
    cpu[0] = 0
    assert lapic.read(APIC_SPIV, 4) == 0x1FF
    assert lapic.writes == [(0, APIC_SPIV, 0x1FF)]


def test_a_pc_refuses_impossible_sizes(k: ModuleType) -> None:
    with pytest.raises(ValueError, match="RAM"):
        PC(k, ram_size=MB)
    with pytest.raises(ValueError, match="vCPUs"):
        PC(k, cpus=0)


# --- kernels built here, on both backends ----------------------------------------------------


@pytest.mark.parametrize("name", ["hello.elf", "hello.bin"])
def test_the_assembly_kernel_prints_and_exits(
    k: ModuleType, kernels: dict[str, Path], name: str
) -> None:
    assert boot(k, kernels[name]) == ("hello from hello.S\n", 0x10 << 1 | 1)


def test_the_c_kernel_reports_what_it_was_booted_with(
    k: ModuleType, kernels: dict[str, Path]
) -> None:
    text, code = boot(k, kernels["probe.elf"], "exit=21 quiet", cpus=2, ram_size=64 * MB)
    assert code == 21 << 1 | 1
    lines = text.splitlines()
    assert lines[:10] == [
        "probe: booted",
        "multiboot magic 2badb002 info 00009500 flags 0000024f",
        "mem_lower 639 KiB mem_upper 64512 KiB",
        'cmdline "probe.elf exit=21 quiet"',
        'loader "kvmlab"',
        "mmap 0000000000000000-000000000009fbff type 1",
        "mmap 000000000009fc00-000000000009ffff type 2",
        "mmap 00000000000f0000-00000000000fffff type 2",
        "mmap 0000000000100000-0000000003ffffff type 1",
        'fw_cfg "QEMU" id 00000001 ram 0000000004000000 cpus 2 max 2',
    ]
    assert lines[10] == 'fw_cfg file 0020 size 20 "etc/e820"'
    cpu = [line for line in lines if line.startswith("cpuid")]
    assert cpu[:2] == [
        'cpuid vendor "AuthenticAMD"',
        "cpuid 00000000: 00000006 68747541 444d4163 69746e65",
    ]
    assert cpu[2].startswith(LEAF_1 + "00060fb1 00000800 ")
    assert all(line.endswith(": 00000000 00000000 00000000 00000000") for line in cpu[3:8])
    assert cpu[8:] == [
        "cpuid 80000000: 80000008 68747541 444d4163 69746e65",
        "cpuid 80000001: 00060fb1 00000000 00000001 20100800",  # LAHF_LM; SYSCALL, NX, LM
        "cpuid 80000002: 6c6d766b 56206261 75747269 43206c61",
        "cpuid 80000003: 00005550 00000000 00000000 00000000",
        "cpuid 80000004: 00000000 00000000 00000000 00000000",
        "cpuid 80000005: 00000000 00000000 00000000 00000000",
        "cpuid 80000006: 00000000 00000000 00000000 00000000",
        "cpuid 80000007: 00000000 00000000 00000000 00000000",
        "cpuid 80000008: 00003028 00000000 00000000 00000000",
        'cpuid brand "kvmlab Virtual CPU"',
        "cpuid 80000009: 00000000 00000000 00000000 00000000",  # past the last: zeros (AMD)
        "cpuid 40000000: 40000001 4b4d564b 564b4d56 0000004d",
        "cpuid 40000001: 00000000 00000000 00000000 00000000",
    ]
    assert lines[-2:] == ["lapic id 00000000 version 00050014", "probe: exit 21"]


@pytest.mark.host
def test_every_kernel_boots_identically_on_the_simulator_and_the_host(
    kernels: dict[str, Path],
) -> None:
    """Every line alike, CPUID included, but the host CPU's extensions PVM adds to leaf 1."""
    host = load_backend("host")
    for name, cmdline in [("hello.elf", ""), ("hello.bin", ""), ("probe.elf", "exit=3")]:
        on_sim, on_host = boot(sim, kernels[name], cmdline), boot(host, kernels[name], cmdline)
        assert on_sim[1] == on_host[1], name
        assert on_sim[0].splitlines() == without_pvm_extensions(on_sim[0])  # the model's bits
        assert on_sim[0].splitlines() == without_pvm_extensions(on_host[0]), name


@pytest.mark.host
def test_without_a_cpu_model_the_kernel_reads_the_same_zeros_on_both(
    kernels: dict[str, Path],
) -> None:
    """No KVM_SET_CPUID2: every leaf reads zero on both, PVM's leaf 1 included."""
    host = load_backend("host")
    on_sim = boot(sim, kernels["probe.elf"], cpu_model=None)
    assert on_sim == boot(host, kernels["probe.elf"], cpu_model=None)
    assert "cpuid 00000000: 00000000 00000000 00000000 00000000" in on_sim[0].splitlines()


def test_a_reset_boots_the_kernel_again_from_a_clean_image(
    k: ModuleType, kernels: dict[str, Path]
) -> None:
    with pc_boot_kernel(kernels["hello.elf"].read_bytes(), k) as pc:
        pc.run()
        pc.memory_write(MB + 0x1000, b"\xff")  # dirty the bss: the reset must zero it again
        pc.reset()
        pc.serial.output.clear()
        pc.run()
        assert (pc.serial.text(), pc.exit_code) == ("hello from hello.S\n", 33)


def test_a_kernel_that_only_halts_halts(k: ModuleType) -> None:
    with pc_boot_kernel(aout_image(), k) as pc:
        assert pc.run(max_exits=10) == EXCP_HLT and pc.exit_code is None
