"""Bad input to the syscall face gets an errno, never another exception (a CI-sized fuzz run)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlab import sys as k
from kvmlab.uapi import KVM_CREATE_VCPU, KVM_CREATE_VM, KVM_RUN
from kvmlab.uapi.ioctl import _IOC

# Arguments that can never be a valid pointer in this process: small numbers, kernel-half
# addresses, and non-canonical ones, so a "successful" random write cannot hit our own heap.
BAD_POINTERS = st.one_of(
    st.integers(0, 4095),
    st.integers(0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF),
    st.integers(0x0000_8000_0000_0000, 0x0000_FFFF_FFFF_FFFF),
)
REQUESTS = st.builds(
    _IOC,
    st.integers(0, 3),
    st.sampled_from([0xAE, 0xAE, 0xAE, 0x00, 0x54]),
    st.integers(0, 255),
    st.integers(0, 600),
)


class Fds:
    """One of each kind of kvmlab fd, made once for the whole run."""

    def __init__(self) -> None:
        self.kvm = k.open("/dev/kvm", os.O_RDWR)
        self.vm = k.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.vcpu = k.ioctl(self.vm, KVM_CREATE_VCPU, 0)


FDS = Fds()


@settings(max_examples=3000, deadline=None)
@given(which=st.sampled_from(["kvm", "vm", "vcpu"]), request=REQUESTS, arg=BAD_POINTERS)
def test_random_ioctls_with_int_arguments_fail_only_with_oserror(
    which: str, request: int, arg: int
) -> None:
    if request in (KVM_RUN, KVM_CREATE_VM, KVM_CREATE_VCPU):
        return  # valid calls that create things or run a guest are exercised elsewhere
    fd = getattr(FDS, which)
    try:
        r = k.ioctl(fd, request, arg)
    except OSError as e:
        assert e.errno is not None and e.errno > 0
    else:
        assert isinstance(r, int)


@settings(max_examples=1500, deadline=None)
@given(
    which=st.sampled_from(["kvm", "vm", "vcpu"]),
    request=REQUESTS,
    arg=st.binary(min_size=0, max_size=600),
    mutable=st.booleans(),
)
def test_random_ioctls_with_buffers_fail_only_with_oserror(
    which: str, request: int, arg: bytes, mutable: bool
) -> None:
    if request in (KVM_RUN, KVM_CREATE_VM, KVM_CREATE_VCPU):
        return
    fd = getattr(FDS, which)
    buf: bytes | bytearray = bytearray(arg) if mutable else arg
    try:
        k.ioctl(fd, request, buf)
    except OSError as e:
        assert e.errno is not None and e.errno > 0
