"""Guest RAM is the caller's memory: a range that stops being mapped is EFAULT, never a crash.

Each check runs in a child interpreter, so a regression shows as a failed test instead of
taking the test run down with a segfault.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent(
    """
    import ctypes, mmap, os
    from kvmlab import sys as k
    from kvmlab.uapi import *

    kvm = k.open("/dev/kvm", os.O_RDWR)
    vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000:0x1003] = bytes([0x8A, 0x07, 0xF4])  # mov al, [bx] ; hlt
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, 0x10000, addr))
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    extra = libc.mmap(None, 0x1000, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    ctypes.memmove(extra, b"\\x5a", 1)
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION,
            kvm_userspace_memory_region(1, 0, 0x20000, 0x1000, extra))
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
    sregs = kvm_sregs(); k.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base = sregs.cs.selector = 0
    sregs.ds.base, sregs.ds.selector = 0x20000, 0x2000
    k.ioctl(vcpu, KVM_SET_SREGS, sregs)
    k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
    k.ioctl(vcpu, KVM_RUN, 0)
    regs = kvm_regs(); k.ioctl(vcpu, KVM_GET_REGS, regs)
    print("before", hex(regs.rax & 0xFF))
    libc.munmap(extra, 0x1000)  # the program drops the memory behind slot 1
    k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
    try:
        k.ioctl(vcpu, KVM_RUN, 0)
        print("after: ran")
    except OSError as e:
        print("after:", e.errno)
    """
)


def test_guest_reading_memory_the_program_unmapped_gets_efault_not_a_crash() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["before 0x5a", "after: 14"]
