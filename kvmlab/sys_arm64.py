"""The syscall face of a simulated arm64 /dev/kvm: the same calls as `kvmlab.sys`.

    from kvmlab import sys_arm64 as k   # instead of: from kvmlab import sys as k
    kvm = k.open("/dev/kvm", os.O_RDWR)  # an arm64 KVM: KVM_ARM_VCPU_INIT, ONE_REG, PSCI

Like a real kernel, kvmlab's has one kvm module loaded at a time, and x86_64 is the one
`kvmlab.sys` loads. Opening /dev/kvm through this face first makes sure the arm64 module is
the loaded one (the kernel's module autoload on open): it unloads the x86_64 module, which
fails with EBUSY while any kvm fd is open, as `rmmod` does. `kvmlab.sys.modprobe()` after
`rmmod()` here brings x86_64 back. ioctl, mmap, close, stats and fd_names are kvmlab.sys's.
"""

from __future__ import annotations

import errno
import os

from kvmlab import sys as _sys
from kvmlab.kernel import fs, kvm_main
from kvmlab.kernel.arch.arm64.arm import kvm_arm_exit, kvm_arm_init

name = "sim-arm64"
DEV_KVM = _sys.DEV_KVM
ioctl = _sys.ioctl
mmap = _sys.mmap
close = _sys.close
stats = _sys.stats
fd_names = _sys.fd_names


def loaded_arch() -> str | None:
    """The architecture of the loaded kvm module ("x86_64", "arm64"), None if none is."""
    if DEV_KVM not in fs.misc_devices or kvm_main.kvm_arch_ops is None:
        return None
    return kvm_main.kvm_arch_ops.name


def modprobe() -> None:
    """Make arm64 the loaded kvm module: unload x86_64 first (EBUSY while it is in use)."""
    arch = loaded_arch()
    if arch == "arm64":
        return
    if arch is not None:
        _sys.rmmod()
    kvm_arm_init()


def rmmod() -> None:
    """Unload the arm64 module (EBUSY while a kvm fd is open); /dev/kvm disappears."""
    if fs.fd_table:
        raise OSError(errno.EBUSY, "kvm module is in use")
    if loaded_arch() == "arm64":
        kvm_arm_exit()


def open(path: str, flags: int, mode: int = 0o777) -> int:
    """os.open; /dev/kvm is the arm64 one (loaded on first open, see the module docstring)."""
    if os.path.normpath(path) == DEV_KVM:
        modprobe()
    return _sys.open(path, flags, mode)
