"""copy_from_user / copy_to_user: the kernel's only way to touch userspace memory.

Userspace hands the simulated kernel raw addresses (ioctl arguments, `userspace_addr`, the dirty
bitmap pointer). They are copied with process_vm_readv/writev on our own pid, which fail with EFAULT
on an unmapped or write-protected address instead of faulting: a bad pointer gets the errno the
kernel gives and never crashes the interpreter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from typing import NoReturn, TypeVar

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _iovec(ctypes.Structure):  # noqa: N801 (C name)
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


for _fn in (_libc.process_vm_readv, _libc.process_vm_writev):
    _fn.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    _fn.restype = ctypes.c_ssize_t

T = TypeVar("T", bound=ctypes.Structure)

TASK_SIZE_MAX = (1 << 47) - 4096  # x86_64 user address space top, as access_ok() checks it


def fail(err: int) -> NoReturn:
    """Return -err from a kernel function: raise the OSError userspace will see."""
    raise OSError(err, os.strerror(err))


def access_ok(addr: int, size: int) -> bool:
    """The kernel's access_ok(): the range lies wholly in the user half of the address space."""
    return addr >= 0 and size >= 0 and addr + size <= TASK_SIZE_MAX


def _transfer(write: bool, local: int, remote: int, size: int) -> None:
    if size == 0:
        return
    if not access_ok(remote, size):
        fail(errno.EFAULT)
    liov = _iovec(local, size)
    riov = _iovec(remote, size)
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    done = fn(os.getpid(), ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
    if done == size:
        return
    if done < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        _transfer_proc_mem(write, local, remote, size)
        return
    fail(errno.EFAULT)


_proc_mem: list[int] = []  # /proc/self/mem, opened on first need


def _transfer_proc_mem(write: bool, local: int, remote: int, size: int) -> None:
    """The same copy through /proc/self/mem, where a sandbox forbids process_vm_readv/writev.

    An unmapped address fails here too (EIO), so it is still EFAULT and never a crash;
    unlike process_vm_writev it writes through a read-only mapping.
    """
    if not _proc_mem:
        _proc_mem.append(os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC))
    fd = _proc_mem[0]
    try:
        if write:
            done = os.pwrite(fd, ctypes.string_at(local, size), remote)
        else:
            data = os.pread(fd, size, remote)
            ctypes.memmove(local, data, len(data))
            done = len(data)
    except OSError:
        fail(errno.EFAULT)
    if done != size:
        fail(errno.EFAULT)


def copy_from_user(addr: int, size: int) -> bytearray:
    """Read `size` bytes of the caller's memory at `addr`; EFAULT if any of it is not readable."""
    buf = bytearray(size)
    if size:
        local = (ctypes.c_char * size).from_buffer(buf)
        _transfer(False, ctypes.addressof(local), addr, size)
    return buf


def copy_struct_from_user(cls: type[T], addr: int) -> T:
    """copy_from_user into a fresh ctypes structure of type `cls`."""
    return cls.from_buffer(copy_from_user(addr, ctypes.sizeof(cls)))


def copy_to_user(addr: int, data: bytes | bytearray | memoryview | ctypes.Structure) -> None:
    """Write `data` into the caller's memory at `addr`; EFAULT if any of it is not writable."""
    src = bytes(data)
    if src:
        local = ctypes.create_string_buffer(src, len(src))
        _transfer(True, ctypes.addressof(local), addr, len(src))


_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4})")


def user_range_access(addr: int, size: int) -> str | None:
    """'rw' / 'r' / None: what the whole range [addr, addr+size) allows, from /proc/self/maps.

    Used when a memory slot's host range is handed to the CPU emulator, which dereferences it
    directly: only a range that is wholly mapped may be given to it.
    """
    end = addr + size
    cursor = addr
    writable = True
    with open("/proc/self/maps") as maps:
        for line in maps:
            m = _MAPS_LINE.match(line)
            if m is None:
                continue
            lo, hi, perms = int(m[1], 16), int(m[2], 16), m[3]
            if hi <= cursor or lo > cursor:
                if lo > cursor and lo < end:
                    return None  # a hole before this mapping
                continue
            if perms[0] != "r":
                return None
            writable = writable and perms[1] == "w"
            cursor = hi
            if cursor >= end:
                return "rw" if writable else "r"
    return None


def user_range_pieces(addr: int, size: int) -> list[tuple[int, int, str | None]]:
    """[addr, addr+size) as (offset, length, perms) runs, one per mapping, from /proc/self/maps.

    perms is the mapping's `rwxs`/`rwxp` field, or None for a hole. A slot whose memory the
    program partly unmapped (munmap, a shrinking mremap) keeps the rest in the guest's view.
    """
    end = addr + size
    pieces: list[tuple[int, int, str | None]] = []
    cursor = addr
    with open("/proc/self/maps") as maps:
        for line in maps:
            m = _MAPS_LINE.match(line)
            if m is None:
                continue
            lo, hi = max(int(m[1], 16), cursor), min(int(m[2], 16), end)
            if hi <= cursor:
                continue
            if lo >= end:
                break
            if lo > cursor:
                pieces.append((cursor - addr, lo - cursor, None))
            pieces.append((lo - addr, hi - lo, m[3]))
            cursor = hi
    if cursor < end:
        pieces.append((cursor - addr, end - cursor, None))
    return pieces
