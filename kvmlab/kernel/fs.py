"""The few VFS pieces KVM relies on: struct file, the fd table, anon_inode_getfd and misc devices.

Every simulated file is backed by a real memfd, so its fd number is a real, unique descriptor of
this process (it shows in /proc/self/fd as `memfd:kvm-vcpu:0`), it follows fork and O_CLOEXEC
like the host's, and a vCPU's `kvm_run` mapping is real shared memory.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmlab.kernel.trace import traced
from kvmlab.kernel.uaccess import fail


class FileOperations(Protocol):
    """struct file_operations: what a kind of file does on ioctl, mmap and the last close."""

    name: str

    def unlocked_ioctl(self, file: File, cmd: int, arg: int) -> int: ...

    def mmap(self, file: File, length: int, offset: int) -> None:
        """Validate a mapping of `length` bytes at `offset`; raise OSError to refuse it."""

    def release(self, file: File) -> None: ...


@dataclass(eq=False)
class File:
    """struct file: an open file with its operations and the object behind it (private_data)."""

    name: str
    f_op: FileOperations
    private_data: Any
    memfd: int
    f_count: int = 1


@dataclass
class MiscDevice:
    """struct miscdevice: a character device node under /dev served by `fops`."""

    minor: int
    name: str
    fops: FileOperations
    open: Any = None  # called with no argument; returns the File's private_data
    nodename: str = field(default="")

    @property
    def path(self) -> str:
        return "/dev/" + (self.nodename or self.name)


_lock = threading.Lock()
fd_table: dict[int, File] = {}
misc_devices: dict[str, MiscDevice] = {}


@traced(args=lambda misc: {"name": misc.path})
def misc_register(misc: MiscDevice) -> None:
    """Make `misc.path` openable; EBUSY if the node is taken."""
    with _lock:
        if misc.path in misc_devices:
            fail(errno.EBUSY)
        misc_devices[misc.path] = misc


@traced(args=lambda misc: {"name": misc.path})
def misc_deregister(misc: MiscDevice) -> None:
    with _lock:
        misc_devices.pop(misc.path, None)


@traced(args=lambda name, fops, private_data, size=0: {"name": name})
def anon_inode_getfd(name: str, fops: FileOperations, private_data: Any, size: int = 0) -> int:
    """Create a file named `anon_inode:<name>` on the host and install it: returns its fd.

    `size` bytes of shared memory back the file for mmap (a vCPU's kvm_run pages).
    """
    memfd = os.memfd_create(name, os.MFD_CLOEXEC)
    if size:
        os.ftruncate(memfd, size)
    with _lock:
        fd_table[memfd] = File(name, fops, private_data, memfd)
    return memfd


def fdget(fd: int) -> File | None:
    """The simulated file behind `fd`, or None for a descriptor that is not ours."""
    return fd_table.get(fd)


def get_file(file: File) -> File:
    """Take a reference: the file outlives its fd while someone holds it (e.g. an mmap)."""
    with _lock:
        file.f_count += 1
    return file


def fput(file: File) -> None:
    """Drop a reference; the last one calls the file's release()."""
    with _lock:
        file.f_count -= 1
        last = file.f_count == 0
    if last:
        file.f_op.release(file)


def close_fd(fd: int) -> None:
    """close(fd): EBADF if it is not open; closes the host descriptor and drops the reference."""
    with _lock:
        file = fd_table.pop(fd, None)
    if file is None:
        fail(errno.EBADF)
    os.close(fd)
    fput(file)
