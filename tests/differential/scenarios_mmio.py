"""Scenarios for KVM_EXIT_MMIO and string I/O: accesses KVM's instruction emulator completes.

MMIO (kvm-api-notes §4.1, §4.2): a guest access to a GPA with no slot, or a write to a READONLY
slot, exits with `mmio.phys_addr/len/is_write`. A read waits with rip AT the instruction; the
next KVM_RUN loads the `len` bytes userspace left in `mmio.data`. A write has already advanced
rip, and `data[0..len)` holds the value, little-endian. Bytes of `mmio.data` past `len` (and all
of it at a read exit) are stale, so they are never compared.

String I/O (INS/OUTS, §4.1): `rep ins` reads ahead and exits once for all elements; `rep outs`
exits once per element with rip still on the `rep` and RFLAGS.RF (bit 16) set until the last
element completes. String I/O always goes through the emulator (on VMX too), so rip at these
exits is comparable, unlike rip at a plain OUT exit (see scenarios_exits).
"""

from __future__ import annotations

import struct
from typing import Any

from kvmlab.uapi import (
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_MEM_READONLY,
)

from .guest import MAX_RUNS, PD_ADDR, Machine, machine, regs_dict, set_region
from .registry import scenario

MMIO_ADDR = 0x100000  # 1 MiB: outside the 64 KiB slot of machine()
RF = 1 << 16  # RFLAGS.RF
MMIO_DATA = 40  # offset of kvm_run.mmio.data
X86_CR4_OSFXSR = 1 << 9  # not in kvmlab.uapi yet: FXSAVE/SSE enabled


def mmio_exit(m: Machine) -> dict[str, Any]:
    """The mmio exit fields; data only for writes (for reads the buffer is stale input space)."""
    r = m.kvm_run()
    out: dict[str, Any] = {
        "phys_addr": r.mmio.phys_addr,
        "len": r.mmio.len,
        "is_write": r.mmio.is_write,
    }
    if r.mmio.is_write:
        out["data"] = bytes(r.mmio.data)[: r.mmio.len]
    return out


def answer_mmio(m: Machine, data: bytes) -> None:
    """Answer a pending MMIO read: the bytes KVM loads on the next KVM_RUN."""
    m.runmap[MMIO_DATA : MMIO_DATA + len(data)] = data


def run_mmio(
    m: Machine, answers: list[bytes] | None = None, regs: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Run to HLT, recording each MMIO exit with rip, rflags and `regs` at the exit.

    Reads are answered from `answers` in order. The HLT exit is the last entry.
    """
    pending = list(answers or [])
    exits: list[dict[str, Any]] = []
    for _ in range(MAX_RUNS):
        reason = m.run()
        r = m.regs()
        seen: dict[str, Any] = {"rip": r.rip, "rflags": r.rflags}
        seen.update({name: getattr(r, name) for name in regs})
        if reason == KVM_EXIT_HLT:
            exits.append({"exit": "HLT", **seen})
            return exits
        assert reason == KVM_EXIT_MMIO, f"unexpected exit {reason}"
        e = mmio_exit(m)
        if not e["is_write"]:
            answer_mmio(m, pending.pop(0))
        exits.append({**e, **seen})
    raise AssertionError(f"no HLT within {MAX_RUNS} runs")


def pick(exits: list[dict[str, Any]], *keys: str) -> list[tuple[Any, ...]]:
    return [tuple(e.get(key) for key in keys) for e in exits]


# Long mode: loads of 1, 2, 4 and 8 bytes from MMIO.
READ_CODE = (
    b"\xbe\x00\x00\x10\x00"  # 1000: mov esi, 0x100000
    b"\x8a\x1e"  # 1005: mov bl, byte ptr [rsi]
    b"\x66\x8b\x4e\x02"  # 1007: mov cx, word ptr [rsi + 2]
    b"\x8b\x56\x04"  # 100b: mov edx, dword ptr [rsi + 4]
    b"\x48\x8b\x7e\x08"  # 100e: mov rdi, qword ptr [rsi + 8]
    b"\xf4"  # 1012: hlt
)


@scenario
def mmio_read_sizes(k: Any) -> dict[str, Any]:
    """MMIO reads of 1/2/4/8 bytes: one exit each, rip AT the load, is_write 0; the next
    KVM_RUN loads the answer (al/ax merge into the register, a 32-bit load zero-extends)."""
    with machine(k, READ_CODE, "long64") as m:
        m.update_regs(
            rbx=0x1111111111111111,
            rcx=0x2222222222222222,
            rdx=0x3333333333333333,
            rdi=0x4444444444444444,
        )
        answers = [b"\xa1", b"\xb1\xb2", b"\xc1\xc2\xc3\xc4", bytes(range(0xD1, 0xD9))]
        exits = run_mmio(m, answers, ("rbx", "rcx", "rdx", "rdi"))
    assert pick(exits, "phys_addr", "len", "is_write", "rip") == [
        (MMIO_ADDR, 1, 0, 0x1005),
        (MMIO_ADDR + 2, 2, 0, 0x1007),
        (MMIO_ADDR + 4, 4, 0, 0x100B),
        (MMIO_ADDR + 8, 8, 0, 0x100E),
        (None, None, None, 0x1013),
    ]
    # Each answer shows up in its register at the following exit.
    assert exits[1]["rbx"] == 0x11111111111111A1
    assert exits[2]["rcx"] == 0x222222222222B2B1
    assert exits[3]["rdx"] == 0xC4C3C2C1
    assert exits[4]["rdi"] == 0xD8D7D6D5D4D3D2D1
    return {"exits": exits}


WRITE_CODE = (
    b"\xbe\x00\x00\x10\x00"  # 1000: mov esi, 0x100000
    b"\xc6\x06\x11"  # 1005: mov byte ptr [rsi], 0x11
    b"\x66\xc7\x46\x02\x33\x22"  # 1008: mov word ptr [rsi + 2], 0x2233
    b"\xc7\x46\x04\x77\x66\x55\x44"  # 100e: mov dword ptr [rsi + 4], 0x44556677
    b"\x48\xb8\xff\xee\xdd\xcc\xbb\xaa\x99\x88"  # 1015: movabs rax, 0x8899aabbccddeeff
    b"\x48\x89\x46\x08"  # 101f: mov qword ptr [rsi + 8], rax
    b"\xf4"  # 1023: hlt
)


@scenario
def mmio_write_sizes(k: Any) -> dict[str, Any]:
    """MMIO writes of 1/2/4/8 bytes: is_write 1, data little-endian, rip already past the store."""
    with machine(k, WRITE_CODE, "long64") as m:
        exits = run_mmio(m)
    assert pick(exits, "phys_addr", "len", "is_write", "data", "rip") == [
        (MMIO_ADDR, 1, 1, b"\x11", 0x1008),
        (MMIO_ADDR + 2, 2, 1, b"\x33\x22", 0x100E),
        (MMIO_ADDR + 4, 4, 1, b"\x77\x66\x55\x44", 0x1015),
        (MMIO_ADDR + 8, 8, 1, b"\xff\xee\xdd\xcc\xbb\xaa\x99\x88", 0x1023),
        (None, None, None, None, 0x1024),
    ]
    return {"exits": exits}


RMW_CODE = (
    b"\xbe\x00\x00\x10\x00"  # 1000: mov esi, 0x100000
    b"\xbb\x40\x30\x20\x10"  # 1005: mov ebx, 0x10203040
    b"\x01\x1e"  # 100a: add dword ptr [rsi], ebx
    b"\xfe\x46\x08"  # 100c: inc byte ptr [rsi + 8]
    b"\xb9\x88\x77\x66\x55"  # 100f: mov ecx, 0x55667788
    b"\x87\x4e\x10"  # 1014: xchg dword ptr [rsi + 0x10], ecx
    b"\xf4"  # 1017: hlt
)


@scenario
def mmio_read_modify_write(k: Any) -> dict[str, Any]:
    """add/inc/xchg on MMIO: a read exit (rip at the instruction), then a write exit with the
    computed value (rip past it); flags and the xchg'd register come from the answered value."""
    with machine(k, RMW_CODE, "long64") as m:
        answers = [b"\x01\x02\x03\x04", b"\xff", b"\xaa\xbb\xcc\xdd"]
        exits = run_mmio(m, answers, ("rcx",))
    assert pick(exits, "phys_addr", "len", "is_write", "data", "rip") == [
        (MMIO_ADDR, 4, 0, None, 0x100A),
        (MMIO_ADDR, 4, 1, b"\x41\x32\x23\x14", 0x100C),  # 0x04030201 + 0x10203040
        (MMIO_ADDR + 8, 1, 0, None, 0x100C),
        (MMIO_ADDR + 8, 1, 1, b"\x00", 0x100F),  # 0xff + 1
        (MMIO_ADDR + 0x10, 4, 0, None, 0x1014),
        (MMIO_ADDR + 0x10, 4, 1, b"\x88\x77\x66\x55", 0x1017),
        (None, None, None, None, 0x1018),
    ]
    hlt = exits[-1]
    assert hlt["rcx"] == 0xDDCCBBAA
    assert hlt["rflags"] == 0x56  # inc 0xff -> 0: ZF, PF, AF (CF 0 from the add)
    return {"exits": exits}


RO_GPA = 0x10000  # a READONLY slot right after the RAM slot
RO_CODE = (
    b"\xbe\x00\x00\x01\x00"  # 1000: mov esi, 0x10000
    b"\x8b\x46\x08"  # 1005: mov eax, dword ptr [esi + 8]
    b"\xc7\x46\x08\x44\x33\x22\x11"  # 1008: mov dword ptr [esi + 8], 0x11223344
    b"\x8b\x5e\x08"  # 100f: mov ebx, dword ptr [esi + 8]
    b"\xfe\x46\x10"  # 1012: inc byte ptr [esi + 0x10]
    b"\xf4"  # 1015: hlt
)


@scenario
def mmio_readonly_slot_write(k: Any) -> dict[str, Any]:
    """A READONLY slot: reads (and the read half of inc) use the memory without exiting; each
    write is an MMIO exit (is_write 1, rip past it) and the memory stays unchanged."""
    with machine(k, RO_CODE, "prot32") as m:
        ro, ro_hva = m.fds.ram(0x2000)
        ro[8:12] = b"\x01\x02\x03\x04"
        ro[0x10] = 0x7F
        r = set_region(k, m.vm_fd, 1, RO_GPA, 0x2000, ro_hva, KVM_MEM_READONLY)
        exits = run_mmio(m, [], ("rax", "rbx"))
        backing = bytes(ro[0:0x20])
    assert r == 0
    assert pick(exits, "phys_addr", "len", "is_write", "data", "rip") == [
        (RO_GPA + 8, 4, 1, b"\x44\x33\x22\x11", 0x100F),
        (RO_GPA + 0x10, 1, 1, b"\x80", 0x1015),
        (None, None, None, None, 0x1016),
    ]
    hlt = exits[-1]
    assert hlt["rax"] == hlt["rbx"] == 0x04030201  # the write did not reach the slot
    assert hlt["rflags"] == 0x892  # inc 0x7f -> 0x80: OF, SF, AF
    assert backing[8:12] == b"\x01\x02\x03\x04" and backing[0x10] == 0x7F
    return {"set_region": r, "exits": exits, "backing": backing}


PAGING_CODE = (
    b"\xbe\x10\x00\x20\x00"  # 1000: mov esi, 0x200010
    b"\x8b\x06"  # 1005: mov eax, dword ptr [rsi]
    b"\xc7\x46\x04\xfe\xca\x00\x00"  # 1007: mov dword ptr [rsi + 4], 0xcafe
    b"\xf4"  # 100e: hlt
)


@scenario
def mmio_through_paging(k: Any) -> dict[str, Any]:
    """Long mode: virtual 0x200000 mapped (2 MiB page) to physical 0xc0000000; MMIO exits
    report the physical address."""
    with machine(k, PAGING_CODE, "long64") as m:
        struct.pack_into("<Q", m.mem, PD_ADDR + 8, 0xC0000000 | 0x83)  # PD[1]: 2 MiB page
        exits = run_mmio(m, [b"\x78\x56\x34\x12"], ("rax",))
    assert pick(exits, "phys_addr", "len", "is_write", "data", "rip") == [
        (0xC0000010, 4, 0, None, 0x1005),
        (0xC0000014, 4, 1, b"\xfe\xca\x00\x00", 0x100E),
        (None, None, None, None, 0x100F),
    ]
    assert exits[-1]["rax"] == 0x12345678
    return {"exits": exits}


MOVS_CODE = (
    b"\xbe\x00\x00\x10\x00"  # 1000: mov esi, 0x100000
    b"\xbf\x00\x20\x00\x00"  # 1005: mov edi, 0x2000
    b"\xa4"  # 100a: movsb byte ptr es:[edi], byte ptr [esi]
    b"\xbe\x10\x20\x00\x00"  # 100b: mov esi, 0x2010
    b"\xbf\x10\x00\x10\x00"  # 1010: mov edi, 0x100010
    b"\xb9\x03\x00\x00\x00"  # 1015: mov ecx, 3
    b"\xf3\xa4"  # 101a: rep movsb byte ptr es:[edi], byte ptr [esi]
    b"\xbe\x20\x00\x10\x00"  # 101c: mov esi, 0x100020
    b"\xbf\x20\x20\x00\x00"  # 1021: mov edi, 0x2020
    b"\xb9\x03\x00\x00\x00"  # 1026: mov ecx, 3
    b"\xf3\xa4"  # 102b: rep movsb byte ptr es:[edi], byte ptr [esi]
    b"\xf4"  # 102d: hlt
)


@scenario
def mmio_movs(k: Any) -> dict[str, Any]:
    """movsb from MMIO; rep movsb RAM->MMIO and MMIO->RAM: one 1-byte exit per element, rip on
    the (rep) movsb. The element's rcx/rsi/rdi are already stepped at a write exit, with RF set;
    a read exit shows the state before that element, RF clear."""
    with machine(k, MOVS_CODE, "prot32") as m:
        m.write(0x2010, b"XYZ")
        exits = run_mmio(m, [b"\x5a", b"a", b"b", b"c"], ("rcx", "rsi", "rdi"))
        copied = (m.read(0x2000, 1), m.read(0x2020, 3))
    assert pick(exits, "phys_addr", "is_write", "data", "rip", "rflags", "rcx", "rsi", "rdi") == [
        (MMIO_ADDR, 0, None, 0x100A, 0x2, 0, MMIO_ADDR, 0x2000),
        (MMIO_ADDR + 0x10, 1, b"X", 0x101A, 0x2 | RF, 2, 0x2011, MMIO_ADDR + 0x11),
        (MMIO_ADDR + 0x11, 1, b"Y", 0x101A, 0x2 | RF, 1, 0x2012, MMIO_ADDR + 0x12),
        (MMIO_ADDR + 0x12, 1, b"Z", 0x101A, 0x2 | RF, 0, 0x2013, MMIO_ADDR + 0x13),
        (MMIO_ADDR + 0x20, 0, None, 0x102B, 0x2, 3, MMIO_ADDR + 0x20, 0x2020),
        (MMIO_ADDR + 0x21, 0, None, 0x102B, 0x2, 2, MMIO_ADDR + 0x21, 0x2021),
        (MMIO_ADDR + 0x22, 0, None, 0x102B, 0x2, 1, MMIO_ADDR + 0x22, 0x2022),
        (None, None, None, 0x102E, 0x2, 0, MMIO_ADDR + 0x23, 0x2023),
    ]
    assert all(e["len"] == 1 for e in exits[:-1])
    assert copied == (b"\x5a", b"abc")
    return {"exits": exits, "copied": copied}


MOVDQU_CODE = (
    b"\xbe\x00\x00\x10\x00"  # 1000: mov esi, 0x100000
    b"\xf3\x0f\x6f\x06"  # 1005: movdqu xmm0, xmmword ptr [esi]
    b"\xf3\x0f\x7f\x46\x10"  # 1009: movdqu xmmword ptr [esi + 0x10], xmm0
    b"\xf4"  # 100e: hlt
)


@scenario
def mmio_movdqu_16_bytes(k: Any) -> dict[str, Any]:
    """A 16-byte SSE load and store on MMIO (CR4.OSFXSR set) are split into two 8-byte exits
    each; the store writes back the 16 bytes the load was given."""
    with machine(k, MOVDQU_CODE, "prot32") as m:
        sregs = m.sregs()
        sregs.cr4 |= X86_CR4_OSFXSR
        m.set_sregs(sregs)
        answers = [bytes(range(0x10, 0x18)), bytes(range(0x18, 0x20))]
        exits = run_mmio(m, answers)
    assert pick(exits, "phys_addr", "len", "is_write", "data", "rip") == [
        (MMIO_ADDR, 8, 0, None, 0x1005),
        (MMIO_ADDR + 8, 8, 0, None, 0x1005),
        (MMIO_ADDR + 0x10, 8, 1, bytes(range(0x10, 0x18)), 0x100E),
        (MMIO_ADDR + 0x18, 8, 1, bytes(range(0x18, 0x20)), 0x100E),
        (None, None, None, None, 0x100F),
    ]
    return {"exits": exits}


# --- string I/O -------------------------------------------------------------------------------


def io_exit(m: Machine) -> dict[str, Any]:
    """The io exit plus rcx/rsi/rdi/rip/rflags at the exit."""
    r = m.regs()
    return {**m.io(), "rcx": r.rcx, "rsi": r.rsi, "rdi": r.rdi, "rip": r.rip, "rflags": r.rflags}


def hlt_regs(m: Machine) -> dict[str, int]:
    regs = regs_dict(m.regs())
    return {name: regs[name] for name in ("rcx", "rsi", "rdi", "rip", "rflags")}


INS_CODE = (
    b"\xba\x60\x00"  # 1000: mov dx, 0x60
    b"\xbf\x00\x20"  # 1003: mov di, 0x2000
    b"\xb9\x03\x00"  # 1006: mov cx, 3
    b"\xf3\x6c"  # 1009: rep insb byte ptr es:[di], dx
    b"\xf4"  # 100b: hlt
    b"\xbf\x10\x20"  # 100c: mov di, 0x2010
    b"\xb9\x03\x00"  # 100f: mov cx, 3
    b"\xf3\x6d"  # 1012: rep insw word ptr es:[di], dx
    b"\xf4"  # 1014: hlt
    b"\xbf\x20\x20"  # 1015: mov di, 0x2020
    b"\xb9\x05\x00"  # 1018: mov cx, 5
    b"\x6c"  # 101b: insb byte ptr es:[di], dx
    b"\xf4"  # 101c: hlt
)


@scenario
def string_io_ins(k: Any) -> dict[str, Any]:
    """rep insb / rep insw with cx=3: ONE exit with count=3 (rip on the rep, rcx still 3); the
    next KVM_RUN stores all elements and leaves rdi advanced, rcx 0, rip past. insb without rep:
    count 1, rcx untouched."""
    steps = []
    with machine(k, INS_CODE) as m:
        for data in (b"abc", b"\x01\x02\x03\x04\x05\x06", b"z"):
            assert m.run() == KVM_EXIT_IO
            at_exit = io_exit(m)
            m.fill_in(data)
            assert m.run() == KVM_EXIT_HLT
            steps.append({"exit": at_exit, "hlt": hlt_regs(m)})
        memory = (m.read(0x2000, 4), m.read(0x2010, 7), m.read(0x2020, 2))
    got = [
        (s["exit"]["size"], s["exit"]["count"], s["exit"]["rip"], s["exit"]["rcx"]) for s in steps
    ]
    assert got == [(1, 3, 0x1009, 3), (2, 3, 0x1012, 3), (1, 1, 0x101B, 5)]
    for s in steps:
        e = s["exit"]
        assert (e["direction"], e["port"], e["data_offset"]) == (KVM_EXIT_IO_IN, 0x60, 0x1000)
        assert e["rflags"] == 0x2
    assert [(s["hlt"]["rdi"], s["hlt"]["rcx"], s["hlt"]["rip"]) for s in steps] == [
        (0x2003, 0, 0x100C),
        (0x2016, 0, 0x1015),
        (0x2021, 5, 0x101D),
    ]
    assert memory == (b"abc\x00", b"\x01\x02\x03\x04\x05\x06\x00", b"z\x00")
    return {"steps": steps, "memory": memory}


OUTS_CODE = (
    b"\xba\x61\x00"  # 1000: mov dx, 0x61
    b"\xbe\x30\x20"  # 1003: mov si, 0x2030
    b"\xb9\x03\x00"  # 1006: mov cx, 3
    b"\xf3\x6f"  # 1009: rep outsw dx, word ptr [si]
    b"\xf4"  # 100b: hlt
)


@scenario
def string_io_rep_outsw(k: Any) -> dict[str, Any]:
    """rep outsw with cx=3: one exit per element (count 1), each with rip still on the rep,
    RFLAGS.RF set, rsi advanced and rcx decremented (0 at the last); RF is clear at HLT."""
    exits = []
    with machine(k, OUTS_CODE) as m:
        m.write(0x2030, b"\x01\x02\x03\x04\x05\x06")
        for _ in range(MAX_RUNS):
            reason = m.run()
            if reason == KVM_EXIT_HLT:
                break
            assert reason == KVM_EXIT_IO
            exits.append(io_exit(m))
        hlt = hlt_regs(m)
    assert [(e["data"], e["rcx"], e["rsi"], e["rip"], e["rflags"]) for e in exits] == [
        (b"\x01\x02", 2, 0x2032, 0x1009, 0x2 | RF),
        (b"\x03\x04", 1, 0x2034, 0x1009, 0x2 | RF),
        (b"\x05\x06", 0, 0x2036, 0x1009, 0x2 | RF),
    ]
    for e in exits:
        assert (e["direction"], e["size"], e["port"], e["count"]) == (KVM_EXIT_IO_OUT, 2, 0x61, 1)
    assert hlt == {"rcx": 0, "rsi": 0x2036, "rdi": 0, "rip": 0x100C, "rflags": 0x2}
    return {"exits": exits, "hlt": hlt}
