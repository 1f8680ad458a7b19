"""The host backend: the syscall face forwarded to the real /dev/kvm.

Same four calls as `kvmlab.sys`, so a scenario written once runs on both. Integer arguments go
through the ioctl system call as an unsigned long, because `fcntl.ioctl` packs them into a C
int and overflows above 2**31 (e.g. KVM_SET_TSS_ADDR 0xfffbd000); the result comes back as the
kernel's long, where libc's int would turn a large one (KVM_GET_TSC_KHZ above 2**31 kHz) into
a bogus error with errno 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap as _mmap
import os
from typing import Any

name = "host"
DEV_KVM = "/dev/kvm"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
SYS_IOCTL = {"x86_64": 16, "aarch64": 29}.get(os.uname().machine, 16)


def available() -> str | None:
    """None when /dev/kvm can be opened and answers KVM_GET_API_VERSION; otherwise the reason."""
    try:
        fd = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{DEV_KVM}: {e.strerror}"
    try:
        fcntl.ioctl(fd, 0xAE00, 0)
    except OSError as e:
        return f"{DEV_KVM} does not answer KVM_GET_API_VERSION: {e.strerror}"
    finally:
        os.close(fd)
    return None


def open(path: str, flags: int, mode: int = 0o777) -> int:
    """os.open."""
    return os.open(path, flags, mode)


def ioctl(fd: int, request: int, arg: int | Any = 0, mutate_flag: bool = True) -> int | bytes:
    """fcntl.ioctl, except that an int argument spans the kernel's whole unsigned long."""
    if isinstance(arg, int):
        r = _libc.syscall(SYS_IOCTL, fd, request & 0xFFFFFFFF, arg & 0xFFFFFFFFFFFFFFFF)
        if r == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(r)
    return fcntl.ioctl(fd, request, arg, mutate_flag)


def mmap(
    fd: int,
    length: int,
    flags: int = _mmap.MAP_SHARED,
    prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE,
    offset: int = 0,
) -> _mmap.mmap:
    """mmap.mmap."""
    return _mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)


def close(fd: int) -> None:
    """os.close."""
    os.close(fd)
