"""copy_from_user / copy_to_user: a bad address is EFAULT, also where process_vm_* is denied."""

from __future__ import annotations

import ctypes
import errno
import mmap

import pytest

from kvmlab.kernel import uaccess


def buffer() -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, 4096)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_copies_both_ways_and_refuses_a_bad_address() -> None:
    m, addr = buffer()
    m[0:4] = b"abcd"
    assert uaccess.copy_from_user(addr, 4) == b"abcd"
    uaccess.copy_to_user(addr + 4, b"XY")
    assert m[4:6] == b"XY"
    with pytest.raises(OSError) as e:
        uaccess.copy_from_user(16, 4)
    assert e.value.errno == errno.EFAULT


class _Denied:
    """process_vm_readv/writev as a seccomp sandbox leaves them: -1 with EPERM."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object) -> int:
        self.calls += 1
        ctypes.set_errno(errno.EPERM)
        return -1


def test_falls_back_to_proc_self_mem_where_process_vm_is_denied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    denied = _Denied()
    monkeypatch.setattr(uaccess._libc, "process_vm_readv", denied)
    monkeypatch.setattr(uaccess._libc, "process_vm_writev", denied)
    m, addr = buffer()
    m[0:3] = b"xyz"
    assert uaccess.copy_from_user(addr, 3) == b"xyz"
    uaccess.copy_to_user(addr, b"Q")
    assert m[0:3] == b"Qyz" and denied.calls == 2
    with pytest.raises(OSError) as e:
        uaccess.copy_from_user(4096 * 16, 8)  # nothing is mapped that low
    assert e.value.errno == errno.EFAULT
