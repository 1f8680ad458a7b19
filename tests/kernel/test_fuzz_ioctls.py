"""Random ioctls on the three kinds of fd: only OSError with a valid errno ever escapes.

Each example is a sequence of ioctls with random numbers and random arguments (ints that are
never a valid pointer, or random buffers) on /dev/kvm, a VM and a vCPU fd. CI runs 10,200
ioctls, seeded (derandomized) so that it is stable; where the host's /dev/kvm is present a
smaller sample runs each sequence on both backends and compares the errno call by call.

`KVMLAB_FUZZ=long` switches to the "kvmlab-fuzz-long" hypothesis profile, 500 times the
examples (or `KVMLAB_FUZZ_SCALE` times) and randomized, for runs of hours:

    KVMLAB_FUZZ=long .venv/bin/pytest tests/kernel/test_fuzz_ioctls.py
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_guests import fuzz  # the fuzz profiles, CI's and the long runs'

from kvmlab import host
from kvmlab import sys as k
from kvmlab.uapi import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_FPU,
    KVM_GET_MP_STATE,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_INTERRUPT,
    KVM_NMI,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_FPU,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSC_KHZ,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_VCPU_EVENTS,
)
from kvmlab.uapi.ioctl import _IOC

SEQUENCE = 20  # ioctls per example
ERRNOS = set(errno.errorcode)
CREATORS = (KVM_RUN, KVM_CREATE_VM, KVM_CREATE_VCPU)  # they create things or run a guest
KNOWN = [  # the ioctls kvmlab implements on x86, so that random calls reach their checks
    KVM_GET_API_VERSION, KVM_CHECK_EXTENSION, KVM_GET_VCPU_MMAP_SIZE, KVM_GET_MSR_INDEX_LIST,
    KVM_GET_SUPPORTED_CPUID, KVM_SET_USER_MEMORY_REGION, KVM_GET_DIRTY_LOG, KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR, KVM_GET_TSC_KHZ, KVM_SET_TSC_KHZ, KVM_GET_REGS, KVM_SET_REGS,
    KVM_GET_SREGS, KVM_SET_SREGS, KVM_GET_MP_STATE, KVM_INTERRUPT, KVM_NMI, KVM_SET_GUEST_DEBUG,
    KVM_SET_CPUID2, KVM_GET_MSRS, KVM_SET_MSRS, KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS,
    KVM_GET_FPU, KVM_SET_FPU, KVM_CREATE_IRQCHIP,
]  # fmt: skip
# Arguments that can never be a valid pointer in this process: small numbers, kernel-half
# addresses, and non-canonical ones, so a "successful" random write cannot hit our own heap.
BAD_POINTERS = st.one_of(
    st.integers(0, 4095),
    st.integers(0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF),
    st.integers(0x0000_8000_0000_0000, 0x0000_FFFF_FFFF_FFFF),
)
RANDOM_REQUESTS = st.builds(
    _IOC,
    st.integers(0, 3),
    st.sampled_from([0xAE, 0xAE, 0xAE, 0x00, 0x54]),
    st.integers(0, 255),
    st.integers(0, 600),
)
REQUESTS = st.one_of(st.sampled_from(KNOWN), RANDOM_REQUESTS).filter(lambda r: r not in CREATORS)
FD_KINDS = st.sampled_from(["kvm", "vm", "vcpu"])


class Fds:
    """One of each kind of fd on a backend."""

    def __init__(self, backend: ModuleType) -> None:
        self.k = backend
        self.kvm = backend.open("/dev/kvm", os.O_RDWR)
        self.vm = backend.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.vcpu = backend.ioctl(self.vm, KVM_CREATE_VCPU, 0)

    def call(self, which: str, request: int, arg: Any) -> int | None:
        """The ioctl's errno, or None when it succeeded."""
        try:
            r = self.k.ioctl(getattr(self, which), request, arg)
        except OSError as e:
            assert e.errno in ERRNOS, e
            return int(e.errno)
        assert isinstance(r, int | bytes)
        return None

    def close(self) -> None:
        for fd in (self.vcpu, self.vm, self.kvm):
            self.k.close(fd)


FDS = Fds(k)  # one set for the whole run: the state random calls leave is part of the test


@fuzz(300)
@given(calls=st.lists(st.tuples(FD_KINDS, REQUESTS, BAD_POINTERS), min_size=SEQUENCE))
def test_random_ioctls_with_int_arguments_fail_only_with_oserror(
    calls: list[tuple[str, int, int]],
) -> None:
    for which, request, arg in calls[:SEQUENCE]:
        FDS.call(which, request, arg)


@fuzz(200)
@given(
    calls=st.lists(
        st.tuples(FD_KINDS, REQUESTS, st.binary(max_size=600), st.booleans()), min_size=SEQUENCE
    )
)
def test_random_ioctls_with_buffers_fail_only_with_oserror(
    calls: list[tuple[str, int, bytes, bool]],
) -> None:
    for which, request, data, mutable in calls[:SEQUENCE]:
        FDS.call(which, request, bytearray(data) if mutable else data)


def _host_or_skip() -> None:
    reason = host.available()
    if reason is not None:
        pytest.skip(f"host /dev/kvm unusable: {reason}")


# Differences by design (docs/kernel.md), left out of the comparison:
# - KVM_CREATE_IRQCHIP: kvmlab has no in-kernel irqchip (ENOTTY); the host creates one.
# - KVM_CHECK_EXTENSION: kvmlab reports only what it implements; both succeed, values differ.
# - KVM_GET_MSRS on /dev/kvm (feature MSRs): EINVAL in kvmlab, not implemented yet.
# - random numbers outside what kvmlab implements: the host implements many more ioctls.
DIFFERENTIAL = [r for r in KNOWN if r != KVM_CREATE_IRQCHIP]
BY_DESIGN = {("kvm", KVM_GET_MSRS)}


def compare(calls: list[tuple[str, int, Any]], make_arg: Callable[[Any], Any]) -> None:
    sim, hst = Fds(k), Fds(host)
    try:
        for i, (which, request, arg) in enumerate(calls):
            got = sim.call(which, request, make_arg(arg))
            want = hst.call(which, request, make_arg(arg))
            assert got == want, f"call {i}: {which} {request:#x} {arg!r}: sim {got} host {want}"
    finally:
        sim.close()
        hst.close()


@fuzz(40)
@given(
    calls=st.lists(
        st.tuples(FD_KINDS, st.sampled_from(DIFFERENTIAL), BAD_POINTERS).filter(
            lambda call: call[:2] not in BY_DESIGN
        ),
        min_size=SEQUENCE,
        max_size=SEQUENCE,
    )
)
def test_random_int_ioctls_give_the_hosts_errno(calls: list[tuple[str, int, int]]) -> None:
    _host_or_skip()
    compare(calls, lambda arg: arg)


def test_a_kernel_write_past_a_small_buffer_is_efault_not_a_corrupt_heap() -> None:
    """Found by the fuzz: KVM_GET_SUPPORTED_CPUID with a 2-byte buffer whose nent is large
    wrote its entries past fcntl's 1024-byte bounce buffer into the heap (an abort later).
    kvmlab's bounce buffer ends at a guard page, so the copy_to_user is EFAULT. In a child,
    as a corrupt heap may only crash the interpreter later."""
    code = """if True:
        import errno, os
        from kvmlab import sys as k
        from kvmlab.uapi import KVM_GET_SUPPORTED_CPUID
        kvm = k.open("/dev/kvm", os.O_RDWR)
        small = b"\\xff\\x10"  # nent 0x10ff: room for all entries, says the header
        for arg in (bytearray(small), small, bytearray(small + bytes(1098))):
            try:
                k.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, arg)
            except OSError as e:
                assert e.errno == errno.EFAULT, e
            else:
                raise AssertionError("no EFAULT")
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-3000:]
