"""Key x86_64 KVM ABI facts and the _IOC helpers, in pure Python (no compiler needed).

`test_layout.py` checks everything against the host headers with gcc; this file pins the numbers
that matter most so they are checked even where gcc or <linux/kvm.h> is missing.
"""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlab import uapi
from kvmlab.uapi.ioctl import (
    _IO,
    _IOC,
    _IOC_DIR,
    _IOC_NR,
    _IOC_READ,
    _IOC_SIZE,
    _IOC_TYPE,
    _IOC_WRITE,
    _IOR,
    _IOW,
    _IOWR,
)

SIZES = {
    "kvm_run": 2352,
    "kvm_regs": 144,
    "kvm_sregs": 312,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_userspace_memory_region": 32,
    "kvm_dirty_log": 16,
    "kvm_guest_debug": 72,
    "kvm_interrupt": 4,
    "kvm_debug_exit_arch": 32,
    "kvm_mp_state": 4,
}

IOCTLS = {
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
}


@pytest.mark.parametrize(("name", "size"), SIZES.items())
def test_struct_size(name: str, size: int) -> None:
    actual = ctypes.sizeof(getattr(uapi, name))
    assert actual == size, f"sizeof({name}): expected {size}, got {actual}"


@pytest.mark.parametrize(
    ("field", "offset"),
    [("io", 32), ("mmio", 32), ("debug", 32), ("kvm_valid_regs", 288), ("s", 304)],
)
def test_kvm_run_offsets(field: str, offset: int) -> None:
    actual = getattr(uapi.kvm_run, field).offset
    assert actual == offset, f"offsetof(kvm_run, {field}): expected {offset}, got {actual}"


@pytest.mark.parametrize(("name", "value"), IOCTLS.items())
def test_ioctl_number(name: str, value: int) -> None:
    actual = getattr(uapi, name)
    assert actual == value, f"{name}: expected {value:#x}, got {actual:#x}"


@given(
    direction=st.integers(0, 3),
    type_=st.integers(0, 0xFF),
    nr=st.integers(0, 0xFF),
    size=st.integers(0, (1 << 14) - 1),
)
def test_ioc_round_trip(direction: int, type_: int, nr: int, size: int) -> None:
    request = _IOC(direction, type_, nr, size)
    assert 0 <= request < 1 << 32
    assert (_IOC_DIR(request), _IOC_TYPE(request), _IOC_NR(request), _IOC_SIZE(request)) == (
        direction,
        type_,
        nr,
        size,
    )


def test_io_macros_directions() -> None:
    assert _IOC_DIR(_IO(0xAE, 1)) == 0
    assert _IOC_DIR(_IOW(0xAE, 1, 4)) == _IOC_WRITE
    assert _IOC_DIR(_IOR(0xAE, 1, 4)) == _IOC_READ
    assert _IOC_DIR(_IOWR(0xAE, 1, 4)) == _IOC_READ | _IOC_WRITE
    assert _IOC_SIZE(_IO(0xAE, 1)) == 0


@pytest.mark.parametrize("size", [1 << 14, (1 << 14) + 1, 1 << 20, -1])
def test_ioc_size_out_of_range(size: int) -> None:
    with pytest.raises(ValueError):
        _IOC(_IOC_READ, 0xAE, 0, size)
    with pytest.raises(ValueError):
        _IOWR(0xAE, 0, size)
