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


def _ioctl(file: fs.File, request: int, arg: Any, mutate_flag: bool) -> Any:
    if isinstance(arg, int):
        return file.f_op.unlocked_ioctl(file, request, arg & _ULONG)
    view = memoryview(arg).cast("B")
    if view.readonly or not mutate_flag:
        if len(view) > _FCNTL_BUFSZ:
            raise ValueError("ioctl string arg too long")
        bounce = ctypes.create_string_buffer(bytes(view), _FCNTL_BUFSZ)
        file.f_op.unlocked_ioctl(file, request, ctypes.addressof(bounce))
        return bounce.raw[: len(view)]
    if len(view) <= _FCNTL_BUFSZ:
        bounce = ctypes.create_string_buffer(bytes(view), _FCNTL_BUFSZ)
        try:
            return file.f_op.unlocked_ioctl(file, request, ctypes.addressof(bounce))
        finally:
            view[:] = bounce.raw[: len(view)]
    target = (ctypes.c_char * len(view)).from_buffer(view)
    return file.f_op.unlocked_ioctl(file, request, ctypes.addressof(target))


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
