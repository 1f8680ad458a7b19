"""Scenarios that run real guest programs: each CPU mode, a compute loop, two VMs, shared RAM."""

from __future__ import annotations

import struct
from typing import Any

from kvmlab.uapi import KVM_EXIT_HLT, KVM_EXIT_IO, KVM_EXIT_IO_OUT

from .guest import CODE_ADDR, DATA_ADDR, PML4_ADDR, machine, regs_dict, segment_dict
from .registry import scenario
from .scenarios_exits import run_to_hlt

# Real mode with CS.base (0x3000) != CS.selector * 16 (0x1000) and DS.base = 0x2000, selector 0.
# Execution starts at CS:IP = 0x0100:0x0010, i.e. linear 0x3010 (hidden base), not 0x1010.
REAL_BASE_CODE = (
    b"\x8c\xc8"  # 3010: mov ax, cs
    b"\xbb\x34\x12"  # 3012: mov bx, 0x1234
    b"\xc7\x06\x10\x00\xef\xbe"  # 3015: mov word ptr [0x10], 0xbeef   ; ds.base + 0x10 = 0x2010
    b"\xea\x00\x14\x00\x00"  # 301b: jmp 0x0000:0x1400                ; reloads cs: base = 0
)
REAL_FAR_TARGET = (
    b"\xb9\x78\x56"  # 1400: mov cx, 0x5678
    b"\x8c\xca"  # 1403: mov dx, cs
    b"\xf4"  # 1405: hlt
)
REAL_DECOY = b"\xb8\xad\x0b\xf4"  # 1010: mov ax, 0xbad; hlt   (where selector*16 + ip points)


@scenario
def real_mode_hidden_cs_base(k: Any) -> dict[str, Any]:
    """Real mode fetches from the hidden CS.base, not selector*16, until a far jump reloads CS."""
    with machine(k, REAL_BASE_CODE, entry=0x10, code_addr=0x3010) as m:
        m.write(0x1400, REAL_FAR_TARGET)
        m.write(0x1010, REAL_DECOY)
        sregs = m.sregs()
        sregs.cs.selector, sregs.cs.base = 0x0100, 0x3000
        sregs.ds.selector, sregs.ds.base = 0x0000, 0x2000
        m.set_sregs(sregs)
        exit_reason = m.run()
        regs = regs_dict(m.regs())
        after = m.sregs()
        out = {
            "exit_reason": exit_reason,
            "regs": regs,
            "cs": segment_dict(after.cs),
            "ds": segment_dict(after.ds),
            "word_at_0x2010": struct.unpack_from("<H", m.mem, 0x2010)[0],
            "word_at_0x10": struct.unpack_from("<H", m.mem, 0x10)[0],
        }
    assert exit_reason == KVM_EXIT_HLT
    assert (regs["rax"], regs["rbx"], regs["rcx"], regs["rdx"]) == (0x0100, 0x1234, 0x5678, 0)
    assert regs["rip"] == 0x1406
    assert (out["cs"]["selector"], out["cs"]["base"]) == (0, 0)
    assert (out["ds"]["selector"], out["ds"]["base"]) == (0, 0x2000)
    assert (out["word_at_0x2010"], out["word_at_0x10"]) == (0xBEEF, 0)
    return out


PROT32_CODE = (
    b"\xb8\x78\x56\x34\x12"  # 1000: mov eax, 0x12345678
    b"\xbb\x00\x20\x00\x00"  # 1005: mov ebx, 0x2000
    b"\x89\x03"  # 100a: mov dword ptr [ebx], eax
    b"\x8b\x4b\x04"  # 100c: mov ecx, dword ptr [ebx+4]
    b"\x01\xc1"  # 100f: add ecx, eax
    b"\xf4"  # 1011: hlt
)


@scenario
def protected_mode_32bit_flat(k: Any) -> dict[str, Any]:
    """32-bit flat protected mode set up through KVM_SET_SREGS alone (no GDT in guest memory)."""
    with machine(k, PROT32_CODE, "prot32") as m:
        m.write(DATA_ADDR + 4, struct.pack("<I", 0x11111111))
        exit_reason = m.run()
        regs = regs_dict(m.regs())
        sregs = m.sregs()
        out = {
            "exit_reason": exit_reason,
            "regs": regs,
            "cs": segment_dict(sregs.cs),
            "ss": segment_dict(sregs.ss),
            "cr0": sregs.cr0,
            "stored": m.u32(DATA_ADDR),
        }
    assert exit_reason == KVM_EXIT_HLT
    assert (regs["rax"], regs["rbx"], regs["rcx"]) == (0x12345678, 0x2000, 0x23456789)
    assert regs["rip"] == CODE_ADDR + len(PROT32_CODE)
    assert out["stored"] == 0x12345678
    assert (out["cs"]["db"], out["cs"]["l"], out["cr0"] & 1) == (1, 0, 1)
    return out


LONG64_CODE = (
    b"\x48\xb8\x88\x77\x66\x55\x44\x33\x22\x11"  # 1000: mov rax, 0x1122334455667788
    b"\x48\xc7\xc3\x00\x20\x00\x00"  # 100a: mov rbx, 0x2000
    b"\x48\x89\x03"  # 1011: mov qword ptr [rbx], rax
    b"\x48\x8b\x4b\x08"  # 1014: mov rcx, qword ptr [rbx+8]
    b"\x48\x01\xc1"  # 1018: add rcx, rax   (not shl: its AF is undefined)
    b"\x0f\x20\xda"  # 101b: mov rdx, cr3
    b"\xf4"  # 101e: hlt
)


@scenario
def long_mode_64bit_paging(k: Any) -> dict[str, Any]:
    """64-bit long mode through guest page tables (PML4 at 0x8000, one identity 2 MiB page)."""
    with machine(k, LONG64_CODE, "long64") as m:
        m.write(DATA_ADDR + 8, struct.pack("<Q", 0x0123456789ABCDEF))
        exit_reason = m.run()
        regs = regs_dict(m.regs())
        sregs = m.sregs()
        out = {
            "exit_reason": exit_reason,
            "regs": regs,
            "cs": segment_dict(sregs.cs),
            "cr0": sregs.cr0,
            "cr3": sregs.cr3,
            "cr4": sregs.cr4,
            "efer": sregs.efer,
            "stored": struct.unpack_from("<Q", m.mem, DATA_ADDR)[0],
        }
    assert exit_reason == KVM_EXIT_HLT
    assert regs["rax"] == 0x1122334455667788 == out["stored"]
    assert regs["rcx"] == 0x124578ABDF124577
    assert regs["rdx"] == PML4_ADDR == out["cr3"]
    assert regs["rip"] == CODE_ADDR + len(LONG64_CODE)
    assert (out["cs"]["l"], out["efer"]) == (1, 0x500)
    return out


COMPUTE_CODE = (
    b"\x31\xc0"  # 1000: xor eax, eax
    b"\xb9\xe8\x03\x00\x00"  # 1002: mov ecx, 1000
    b"\x01\xc8"  # 1007: add eax, ecx     <-+
    b"\xe2\xfc"  # 1009: loop 0x1007      --+
    b"\xe7\x10"  # 100b: out 0x10, eax
    b"\x89\xc3"  # 100d: mov ebx, eax
    b"\xf4"  # 100f: hlt
)


@scenario
def compute_loop_sum(k: Any) -> dict[str, Any]:
    """Sum 1..1000 in a loop, OUT the result, HLT: the data and the final registers and flags."""
    with machine(k, COMPUTE_CODE, "prot32") as m:
        exits = run_to_hlt(m)
        regs = regs_dict(m.regs())
    assert [(e["port"], e["size"], e["data"]) for e in exits] == [
        (0x10, 4, struct.pack("<I", 500500))
    ]
    assert (regs["rax"], regs["rbx"], regs["rcx"]) == (500500, 500500, 0)
    assert regs["rip"] == CODE_ADDR + len(COMPUTE_CODE)
    return {"exits": exits, "regs": regs}


VM_A_CODE = (  # real mode
    b"\xb0\x01"  # 1000: mov al, 1
    b"\xe6\x10"  # 1002: out 0x10, al
    b"\xfe\xc0"  # 1004: inc al
    b"\xe6\x10"  # 1006: out 0x10, al
    b"\xf4"  # 1008: hlt
)
VM_B_CODE = (  # 32-bit protected mode
    b"\xb8\x00\x01\x00\x00"  # 1000: mov eax, 0x100
    b"\xe7\x20"  # 1005: out 0x20, eax
    b"\x01\xc0"  # 1007: add eax, eax
    b"\xe7\x20"  # 1009: out 0x20, eax
    b"\xf4"  # 100b: hlt
)


@scenario
def two_vms_interleaved(k: Any) -> dict[str, Any]:
    """Two independent VMs, run alternately: each keeps its own memory, registers and exits."""
    trace: list[tuple[str, int, int, bytes]] = []
    with machine(k, VM_A_CODE) as a, machine(k, VM_B_CODE, "prot32") as b:
        for _ in range(3):
            for label, m in (("A", a), ("B", b)):
                reason = m.run()
                if reason == KVM_EXIT_IO:
                    io = m.io()
                    trace.append((label, reason, io["port"], io["data"]))
                else:
                    trace.append((label, reason, 0, b""))
        regs = {"A": regs_dict(a.regs()), "B": regs_dict(b.regs())}
    assert trace == [
        ("A", KVM_EXIT_IO, 0x10, b"\x01"),
        ("B", KVM_EXIT_IO, 0x20, b"\x00\x01\x00\x00"),
        ("A", KVM_EXIT_IO, 0x10, b"\x02"),
        ("B", KVM_EXIT_IO, 0x20, b"\x00\x02\x00\x00"),
        ("A", KVM_EXIT_HLT, 0, b""),
        ("B", KVM_EXIT_HLT, 0, b""),
    ]
    assert (regs["A"]["rax"], regs["A"]["rip"]) == (2, CODE_ADDR + len(VM_A_CODE))
    assert (regs["B"]["rax"], regs["B"]["rip"]) == (0x200, CODE_ADDR + len(VM_B_CODE))
    return {"trace": trace, "regs": regs}


STORE_CODE = (
    b"\xc7\x05\x00\x20\x00\x00\xef\xbe\xad\xde"  # 1000: mov dword ptr [0x2000], 0xdeadbeef
    b"\xe6\x10"  # 100a: out 0x10, al
    b"\xf4"  # 100c: hlt
)


@scenario
def guest_store_visible_to_host(k: Any) -> dict[str, Any]:
    """A guest store is in the host's buffer at the next exit (RAM is shared, not copied)."""
    with machine(k, STORE_CODE, "prot32") as m:
        before = m.u32(DATA_ADDR)
        first = m.run()
        at_out = m.u32(DATA_ADDR)
        second = m.run()
    out = {"before": before, "exits": (first, second), "at_out": at_out}
    assert out == {"before": 0, "exits": (KVM_EXIT_IO, KVM_EXIT_HLT), "at_out": 0xDEADBEEF}
    return out


HOST_WRITE_CODE = (
    b"\xa1\x00\x20\x00\x00"  # 1000: mov eax, dword ptr [0x2000]
    b"\xe6\x10"  # 1005: out 0x10, al
    b"\x8b\x1d\x00\x20\x00\x00"  # 1007: mov ebx, dword ptr [0x2000]
    b"\x89\x1d\x08\x20\x00\x00"  # 100d: mov dword ptr [0x2008], ebx
    b"\xf4"  # 1013: hlt
)


@scenario
def host_write_visible_to_guest(k: Any) -> dict[str, Any]:
    """A host write to guest RAM between two runs is what the guest reads next."""
    with machine(k, HOST_WRITE_CODE, "prot32") as m:
        m.write(DATA_ADDR, struct.pack("<I", 0x11111111))
        first = m.run()
        io = m.io()
        m.write(DATA_ADDR, struct.pack("<I", 0x22222222))
        second = m.run()
        regs = regs_dict(m.regs())
        copied = m.u32(DATA_ADDR + 8)
    assert (first, io["direction"], io["data"]) == (KVM_EXIT_IO, KVM_EXIT_IO_OUT, b"\x11")
    assert second == KVM_EXIT_HLT
    assert (regs["rax"], regs["rbx"], copied) == (0x11111111, 0x22222222, 0x22222222)
    return {"exits": (first, second), "io": io, "regs": regs, "copied": copied}
