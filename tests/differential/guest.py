"""Building blocks for differential scenarios: fds that always get closed, and a ready-made VM.

Everything here speaks only the syscall face `k` (`k.open`, `k.ioctl`, `k.mmap`, `k.close`) plus
`kvmlab.uapi`, so a scenario built on it runs unchanged on the simulator and on the host.

Guest memory layout used by `machine()` (one slot of `MEM_SIZE` bytes at guest physical 0):

    0x1000  CODE_ADDR   guest code (the entry point)
    0x2000  DATA_ADDR   scratch data shared with the host
    0x8000  PML4_ADDR   long mode only: PML4 -> PDPT (0x9000) -> PD (0xa000), one 2 MiB page
    0xf000  STACK_TOP   initial rsp
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    SEGMENT_NAMES,
    X86_CR0_ET,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    X86_EFER_LMA,
    X86_EFER_LME,
    kvm_regs,
    kvm_run,
    kvm_segment,
    kvm_sregs,
    kvm_userspace_memory_region,
)

DEV_KVM = "/dev/kvm"
PAGE = 0x1000
MEM_SIZE = 0x10000
CODE_ADDR = 0x1000
DATA_ADDR = 0x2000
PML4_ADDR = 0x8000
PDPT_ADDR = 0x9000
PD_ADDR = 0xA000
STACK_TOP = 0xF000
MAX_RUNS = 64  # upper bound on KVM_RUN calls in any scenario loop

KVM_RUN_SIZE = ctypes.sizeof(kvm_run)
GPRS = [name for name, _ in kvm_regs._fields_]
SEGMENT_FIELDS = [name for name, _ in kvm_segment._fields_ if name != "padding"]


def errname(e: OSError) -> str:
    """The errno of a failed call as its symbolic name, e.g. "EINVAL"."""
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def try_ioctl(k: Any, fd: int, request: int, arg: int | bytes | bytearray = 0) -> int | str:
    """k.ioctl's integer result, or the errno name if it failed (result fds are NOT closed)."""
    try:
        r = k.ioctl(fd, request, arg)
    except OSError as e:
        return errname(e)
    return r if isinstance(r, int) else 0


def region(slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> kvm_userspace_memory_region:
    """A kvm_userspace_memory_region filled in field by field."""
    return kvm_userspace_memory_region(
        slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva
    )


def set_region(
    k: Any, vm_fd: int, slot: int, gpa: int, size: int, hva: int, flags: int = 0
) -> int | str:
    """KVM_SET_USER_MEMORY_REGION: 0 or the errno name."""
    return try_ioctl(
        k, vm_fd, KVM_SET_USER_MEMORY_REGION, bytes(region(slot, gpa, size, hva, flags))
    )


def buffer_address(buf: mmap.mmap) -> int:
    """The process address of an mmap (what goes into userspace_addr)."""
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # release the export so the mapping can be closed later


def get_regs(k: Any, vcpu_fd: int) -> kvm_regs:
    buf = bytearray(ctypes.sizeof(kvm_regs))
    k.ioctl(vcpu_fd, KVM_GET_REGS, buf)
    return kvm_regs.from_buffer_copy(buf)


def set_regs(k: Any, vcpu_fd: int, regs: kvm_regs) -> None:
    k.ioctl(vcpu_fd, KVM_SET_REGS, bytes(regs))


def get_sregs(k: Any, vcpu_fd: int) -> kvm_sregs:
    buf = bytearray(ctypes.sizeof(kvm_sregs))
    k.ioctl(vcpu_fd, KVM_GET_SREGS, buf)
    return kvm_sregs.from_buffer_copy(buf)


def try_set_sregs(k: Any, vcpu_fd: int, sregs: kvm_sregs) -> int | str:
    return try_ioctl(k, vcpu_fd, KVM_SET_SREGS, bytes(sregs))


def regs_dict(regs: kvm_regs) -> dict[str, int]:
    """Every field of kvm_regs, by name."""
    return {name: getattr(regs, name) for name in GPRS}


def segment_dict(seg: kvm_segment) -> dict[str, int]:
    return {name: getattr(seg, name) for name in SEGMENT_FIELDS}


def sregs_dict(sregs: kvm_sregs) -> dict[str, Any]:
    """Every field of kvm_sregs as plain data (segments as dicts, tables as (base, limit))."""
    out: dict[str, Any] = {name: segment_dict(getattr(sregs, name)) for name in SEGMENT_NAMES}
    out["gdt"] = (sregs.gdt.base, sregs.gdt.limit)
    out["idt"] = (sregs.idt.base, sregs.idt.limit)
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        out[name] = getattr(sregs, name)
    out["interrupt_bitmap"] = tuple(sregs.interrupt_bitmap)
    return out


def flat_segment(seg: kvm_segment, selector: int, type_: int, *, long: bool = False) -> None:
    """A present, flat (base 0, 4 GiB, page-granular) ring-0 code or data segment."""
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if long else 1
    seg.s = 1
    seg.l = 1 if long else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def write_page_tables(mem: mmap.mmap) -> None:
    """Identity-map the first 2 MiB with one large page: PML4[0] -> PDPT[0] -> PD[0] (PS)."""
    struct.pack_into("<Q", mem, PML4_ADDR, PDPT_ADDR | 0x3)  # present, writable
    struct.pack_into("<Q", mem, PDPT_ADDR, PD_ADDR | 0x3)
    struct.pack_into("<Q", mem, PD_ADDR, 0x0 | 0x83)  # present, writable, 2 MiB page


def setup_mode(sregs: kvm_sregs, mode: str) -> None:
    """Turn reset-state sregs into `mode`: "real", "prot32" (flat, no GDT) or "long64"."""
    if mode == "real":
        sregs.cs.selector = 0
        sregs.cs.base = 0
        return
    if mode == "prot32":
        flat_segment(sregs.cs, 0x08, 0xB)
        for name in ("ds", "es", "fs", "gs", "ss"):
            flat_segment(getattr(sregs, name), 0x10, 0x3)
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET
        return
    if mode == "long64":
        flat_segment(sregs.cs, 0x08, 0xB, long=True)
        for name in ("ds", "es", "fs", "gs", "ss"):
            flat_segment(getattr(sregs, name), 0x10, 0x3)
        sregs.cr3 = PML4_ADDR
        sregs.cr4 = X86_CR4_PAE
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
        sregs.efer = X86_EFER_LME | X86_EFER_LMA
        return
    raise ValueError(f"unknown mode {mode!r}")


class Fds:
    """Opens fds and mappings through `k` and closes every one of them, newest first, on exit."""

    def __init__(self, k: Any) -> None:
        self.k = k
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._order: list[tuple[str, Any]] = []

    def __enter__(self) -> Fds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    def track(self, fd: int) -> int:
        """Take ownership of an fd opened elsewhere (e.g. returned by a raw ioctl)."""
        self._fds.append(fd)
        self._order.append(("fd", fd))
        return fd

    def track_map(self, m: mmap.mmap) -> mmap.mmap:
        self._maps.append(m)
        self._order.append(("map", m))
        return m

    def open_kvm(self) -> int:
        return self.track(self.k.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC))

    def create_vm(self, sys_fd: int, type_: int = 0) -> int:
        return self.track(self.k.ioctl(sys_fd, KVM_CREATE_VM, type_))

    def create_vcpu(self, vm_fd: int, vcpu_id: int = 0) -> int:
        return self.track(self.k.ioctl(vm_fd, KVM_CREATE_VCPU, vcpu_id))

    def ram(self, size: int = MEM_SIZE) -> tuple[mmap.mmap, int]:
        """Anonymous shared guest RAM and its process address."""
        m = self.track_map(mmap.mmap(-1, size))
        return m, buffer_address(m)

    def map_run(self, sys_fd: int, vcpu_fd: int) -> mmap.mmap:
        size = self.k.ioctl(sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        return self.track_map(self.k.mmap(vcpu_fd, size))

    def close(self, fd: int) -> None:
        """Close one tracked fd now (it is then skipped at exit)."""
        self._fds.remove(fd)
        self.k.close(fd)

    def close_all(self) -> None:
        while self._order:
            kind, obj = self._order.pop()
            if kind == "fd":
                if obj in self._fds:
                    self._fds.remove(obj)
                    self.k.close(obj)
            elif obj in self._maps:
                self._maps.remove(obj)
                obj.close()


class Machine:
    """One VM with RAM at guest physical 0 and one vCPU whose kvm_run page is mapped."""

    def __init__(self, k: Any, fds: Fds, sys_fd: int, vm_fd: int, vcpu_fd: int) -> None:
        self.k = k
        self.fds = fds
        self.sys_fd = sys_fd
        self.vm_fd = vm_fd
        self.vcpu_fd = vcpu_fd
        self.mem: mmap.mmap
        self.hva = 0
        self.runmap: mmap.mmap

    # --- running ------------------------------------------------------------------------------
    def run(self) -> int:
        """KVM_RUN; returns the exit reason (raises OSError if KVM_RUN fails)."""
        self.k.ioctl(self.vcpu_fd, KVM_RUN, 0)
        return self.exit_reason

    def try_run(self, arg: int = 0) -> int | str:
        """KVM_RUN: the exit reason, or the errno name if KVM_RUN failed."""
        r = try_ioctl(self.k, self.vcpu_fd, KVM_RUN, arg)
        return r if isinstance(r, str) else self.exit_reason

    # --- kvm_run ------------------------------------------------------------------------------
    def kvm_run(self) -> Any:
        """A copy of struct kvm_run as it is now."""
        return kvm_run.from_buffer_copy(self.runmap[:KVM_RUN_SIZE])

    @property
    def exit_reason(self) -> int:
        return int(struct.unpack_from("<I", self.runmap, 8)[0])

    def set_immediate_exit(self, value: int) -> None:
        self.runmap[1] = value

    def set_run_cr8(self, value: int) -> None:
        """kvm_run.cr8: loaded into the vCPU on every entry (no in-kernel LAPIC)."""
        struct.pack_into("<Q", self.runmap, 16, value)

    def header(self) -> dict[str, int]:
        """The kvm_run fields before the exit union."""
        r = self.kvm_run()
        return {
            "request_interrupt_window": r.request_interrupt_window,
            "immediate_exit": r.immediate_exit,
            "exit_reason": r.exit_reason,
            "ready_for_interrupt_injection": r.ready_for_interrupt_injection,
            "if_flag": r.if_flag,
            "flags": r.flags,
            "cr8": r.cr8,
            "apic_base": r.apic_base,
        }

    def io(self) -> dict[str, Any]:
        """The io exit fields, with the data bytes (count * size at data_offset)."""
        r = self.kvm_run()
        n = r.io.size * r.io.count
        off = r.io.data_offset
        return {
            "direction": r.io.direction,
            "size": r.io.size,
            "port": r.io.port,
            "count": r.io.count,
            "data_offset": off,
            "data": bytes(self.runmap[off : off + n]),
        }

    def fill_in(self, data: bytes) -> None:
        """Answer a pending IN: write its bytes where io.data_offset points."""
        off = struct.unpack_from("<Q", self.runmap, 40)[0]
        self.runmap[off : off + len(data)] = data

    # --- registers ----------------------------------------------------------------------------
    def regs(self) -> kvm_regs:
        return get_regs(self.k, self.vcpu_fd)

    def set_regs(self, regs: kvm_regs) -> None:
        set_regs(self.k, self.vcpu_fd, regs)

    def update_regs(self, **values: int) -> None:
        regs = self.regs()
        for name, value in values.items():
            setattr(regs, name, value)
        self.set_regs(regs)

    def sregs(self) -> kvm_sregs:
        return get_sregs(self.k, self.vcpu_fd)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        self.k.ioctl(self.vcpu_fd, KVM_SET_SREGS, bytes(sregs))

    # --- memory -------------------------------------------------------------------------------
    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem[gpa : gpa + n])

    def u32(self, gpa: int) -> int:
        return int(struct.unpack_from("<I", self.mem, gpa)[0])


@contextmanager
def machine(
    k: Any,
    code: bytes = b"",
    mode: str = "real",
    *,
    entry: int = CODE_ADDR,
    code_addr: int | None = None,
    mem_size: int = MEM_SIZE,
    vcpu_id: int = 0,
) -> Iterator[Machine]:
    """A VM with `mem_size` bytes of RAM at GPA 0, `code` loaded, one vCPU set up for `mode`.

    `code` is written at `code_addr` (default: `entry`); the vCPU starts at rip=`entry` with
    rsp=STACK_TOP and rflags=0x2. Every fd and mapping is closed when the block ends.
    """
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        mem, hva = fds.ram(mem_size)
        r = set_region(k, vm_fd, 0, 0, mem_size, hva)
        assert r == 0, r
        vcpu_fd = fds.create_vcpu(vm_fd, vcpu_id)
        m = Machine(k, fds, sys_fd, vm_fd, vcpu_fd)
        m.mem, m.hva = mem, hva
        m.runmap = fds.map_run(sys_fd, vcpu_fd)
        addr = entry if code_addr is None else code_addr
        m.write(addr, code)
        if mode == "long64":
            write_page_tables(mem)
        sregs = m.sregs()
        setup_mode(sregs, mode)
        m.set_sregs(sregs)
        regs = kvm_regs()
        regs.rip = entry
        regs.rsp = STACK_TOP
        regs.rflags = 0x2
        m.set_regs(regs)
        yield m
