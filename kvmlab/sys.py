"""The syscall face of the simulated /dev/kvm: open, ioctl, mmap and close.

Each call has the signature and the failure mode (OSError with the kernel's errno) of
`os.open`, `fcntl.ioctl`, `mmap.mmap` and `os.close`, so a program written for the host's
/dev/kvm runs unchanged with those four swapped for these. Descriptors that are not kvmlab's
(or paths other than /dev/kvm) go to the real calls.

    from kvmlab import sys as k
    kvm = k.open("/dev/kvm", os.O_RDWR)
    vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import mmap as _mmap
import os
import threading
from typing import Any

from kvmlab.kernel import fs, signals
from kvmlab.kernel.arch.x86.x86 import vmx_exit, vmx_init
from kvmlab.kernel.kvm_main import KvmVcpu

name = "sim"
DEV_KVM = "/dev/kvm"
_FCNTL_BUFSZ = 1024  # fcntl.ioctl's bounce buffer for immutable and small arguments
_ULONG = (1 << 64) - 1

vmx_init()  # the kvm module is loaded when kvmlab.sys is imported


def modprobe() -> None:
    """Load the simulated kvm module (vmx_init -> kvm_init -> misc_register) if it is not."""
    if DEV_KVM not in fs.misc_devices:
        vmx_init()


def rmmod() -> None:
    """Unload it: /dev/kvm disappears (open gives ENOENT). Like `rmmod kvm_intel`, this fails
    with EBUSY while the module is in use (a /dev/kvm, VM or vCPU fd is open)."""
    if fs.fd_table:
        raise OSError(errno.EBUSY, "kvm module is in use")
    if DEV_KVM in fs.misc_devices:
        vmx_exit()


def open(path: str, flags: int, mode: int = 0o777) -> int:
    """os.open: a registered device (/dev/kvm) opens the simulated one; anything else is real."""
    path = os.path.normpath(path)
    misc = fs.misc_devices.get(path)
    if misc is None:
        if path == DEV_KVM:  # never the host's: the simulated module is just not loaded
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return os.open(path, flags, mode)
    signals.start_signal_watcher()  # from the main thread, where programs open /dev/kvm
    return fs.anon_inode_getfd(misc.name, misc.fops, None)


def ioctl(fd: int, request: int, arg: Any = 0, mutate_flag: bool = True) -> Any:
    """fcntl.ioctl: an int is passed as the unsigned long argument; a buffer by address.

    A writable buffer is updated in place (and the return value is the ioctl's result) unless
    `mutate_flag` is false; an immutable one comes back as a new bytes object, as with fcntl.
    """
    file = fs.fdget(fd)
    if file is None:
        return fcntl.ioctl(fd, request, arg, mutate_flag)
    fs.get_file(file)  # as fdget does: a close() meanwhile cannot free what the call is using
    try:
        return _ioctl(file, request & 0xFFFFFFFF, arg, mutate_flag)
    finally:
        fs.fput(file)


def _syscall_return(r: int) -> int:
    """The system call's convention: a result in [-4095, -1] is an errno, whatever produced it
    (KVM_GET_TSC_KHZ of 0xffffff84 kHz reads as errno 124 on the host too)."""
    if -4095 <= r < 0:
        raise OSError(-r, os.strerror(-r))
    return r


def _ioctl(file: fs.File, request: int, arg: Any, mutate_flag: bool) -> Any:
    if isinstance(arg, int):
        return _syscall_return(file.f_op.unlocked_ioctl(file, request, arg & _ULONG))
    view = memoryview(arg).cast("B")
    if (view.readonly or not mutate_flag) and len(view) > _FCNTL_BUFSZ:
        raise ValueError("ioctl string arg too long")
    # fcntl's bounce buffer, or the caller's own buffer when it is larger; either way placed
    # right before a guard page, so a kernel write past its end is EFAULT, not a corrupt heap
    size = max(len(view), _FCNTL_BUFSZ)
    bounce = _guarded(size)
    ctypes.memmove(bounce, bytes(view), len(view))
    ctypes.memset(bounce + len(view), 0, size - len(view))
    try:
        r = file.f_op.unlocked_ioctl(file, request, bounce)
    finally:
        if not view.readonly and mutate_flag:
            view[:] = ctypes.string_at(bounce, len(view))
    if view.readonly or not mutate_flag:
        _syscall_return(r)
        return ctypes.string_at(bounce, len(view))
    return _syscall_return(r)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
_libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_bounce = threading.local()


class _GuardedBuffer:
    """Anonymous memory whose last page is PROT_NONE: `end` is the first inaccessible byte."""

    def __init__(self, size: int) -> None:
        self.length = -(-size // _mmap.PAGESIZE) * _mmap.PAGESIZE + _mmap.PAGESIZE
        flags = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS
        addr = _libc.mmap(None, self.length, _mmap.PROT_READ | _mmap.PROT_WRITE, flags, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise MemoryError("mmap for the ioctl bounce buffer failed")
        self.addr, self._munmap = addr, _libc.munmap  # still there at interpreter exit
        self.end = addr + self.length - _mmap.PAGESIZE
        _libc.mprotect(self.end, _mmap.PAGESIZE, 0)

    def __del__(self) -> None:
        self._munmap(self.addr, self.length)


def _guarded(size: int) -> int:
    """This thread's bounce buffer: the address of `size` bytes that end at a guard page."""
    buf: _GuardedBuffer | None = getattr(_bounce, "buf", None)
    if buf is None or buf.end - buf.addr < size:
        buf = _bounce.buf = _GuardedBuffer(size)
    return buf.end - size


def mmap(
    fd: int,
    length: int,
    flags: int = _mmap.MAP_SHARED,
    prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE,
    offset: int = 0,
) -> _mmap.mmap:
    """mmap.mmap: a vCPU fd maps its kvm_run page and the pages after it."""
    file = fs.fdget(fd)
    if file is not None:
        file.f_op.mmap(file, length, offset)
    return _mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)


def stats(fd: int) -> dict[str, int]:
    """A vCPU's counters (struct kvm_vcpu_stat: exits, io_exits, mmio_exits, halt_exits, ...).

    Not a syscall: the host shows the same counters through KVM_GET_STATS_FD and debugfs.
    """
    file = fs.fdget(fd)
    vcpu = getattr(file, "private_data", None)
    if file is None or not isinstance(vcpu, KvmVcpu):
        raise OSError(errno.EBADF, "not a kvmlab vCPU fd")
    return dataclasses.asdict(vcpu.stat)


def fd_names() -> dict[int, str]:
    """The simulated fds of this process by the name /proc/self/fd gives them on the host
    (`anon_inode:kvm-vm`, `anon_inode:kvm-vcpu:0`, `/dev/kvm`); the memfds behind them show
    as `memfd:kvm-vm` in the real /proc."""
    return {
        fd: "/dev/kvm" if file.name == "kvm" else f"anon_inode:{file.name}"
        for fd, file in sorted(fs.fd_table.items())
    }


def close(fd: int) -> None:
    """os.close."""
    if fs.fdget(fd) is None:
        os.close(fd)
        return
    fs.close_fd(fd)
