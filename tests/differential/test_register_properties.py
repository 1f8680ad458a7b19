"""Property tests: random register states through KVM_SET/GET_(S)REGS, simulator against host.

General registers round-trip exactly (rflags with bit 1 forced); a random mix of CR0, CR4,
EFER and CS.L is refused with EINVAL exactly when the host refuses it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlab import host
from kvmlab import sys as sim
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    kvm_regs,
    kvm_sregs,
)

U64 = st.integers(0, 2**64 - 1)
# rflags bits a guest may hold: not the reserved ones (VM entry would fail on hardware), and
# not VM (bit 17): virtual-8086 mode is vendor business (PVM drops the bit) and kvmlab lacks it
RFLAGS = st.integers(0, 0x3F7FD7).map(lambda v: v & 0x3DFFD7)


class Vcpu:
    """One vCPU on one backend, kept for the whole run."""

    def __init__(self, k: Any) -> None:
        self.k = k
        self.sys_fd = k.open("/dev/kvm", os.O_RDWR)
        self.vm = k.ioctl(self.sys_fd, KVM_CREATE_VM, 0)
        self.fd = k.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        self.reset = kvm_sregs()
        k.ioctl(self.fd, KVM_GET_SREGS, self.reset)

    def set_sregs(self, sregs: kvm_sregs) -> str:
        try:
            self.k.ioctl(self.fd, KVM_SET_SREGS, sregs)
        except OSError as e:
            return errno.errorcode[e.errno or 0]
        return "ok"


SIM = Vcpu(sim)
HOST = Vcpu(host) if host.available() is None else None


@settings(max_examples=300, deadline=None)
@given(values=st.lists(U64, min_size=17, max_size=17), rflags=RFLAGS)
def test_general_registers_round_trip(values: list[int], rflags: int) -> None:
    for vcpu in filter(None, (SIM, HOST)):
        regs = kvm_regs(*values, rflags)
        vcpu.k.ioctl(vcpu.fd, KVM_SET_REGS, regs)
        back = kvm_regs()
        vcpu.k.ioctl(vcpu.fd, KVM_GET_REGS, back)
        assert bytes(back) == bytes(kvm_regs(*values, rflags | 2)), vcpu.k.name


CR0_BITS = [0, 1, 2, 3, 4, 5, 16, 18, 29, 30, 31, 32]
CR4_BITS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 31]  # defined ones, and always-reserved ones
EFER_BITS = [0, 8, 10, 11]


def bits(choices: list[int]) -> st.SearchStrategy[int]:
    return st.sets(st.sampled_from(choices)).map(lambda s: sum(1 << b for b in s))


@pytest.mark.skipif(HOST is None, reason=f"host /dev/kvm unusable: {host.available()}")
@settings(max_examples=300, deadline=None)
@given(cr0=bits(CR0_BITS), cr4=bits(CR4_BITS), efer=bits(EFER_BITS), cs_l=st.booleans())
def test_sregs_are_refused_exactly_when_the_host_refuses_them(
    cr0: int, cr4: int, efer: int, cs_l: bool
) -> None:
    assert HOST is not None
    answers = []
    for vcpu in (SIM, HOST):
        sregs = kvm_sregs.from_buffer_copy(bytes(vcpu.reset))
        sregs.cr0, sregs.cr4, sregs.efer, sregs.cs.l = cr0, cr4, efer, int(cs_l)
        answers.append(vcpu.set_sregs(sregs))
        vcpu.set_sregs(vcpu.reset)
    assert answers[0] == answers[1], (hex(cr0), hex(cr4), hex(efer), cs_l, answers)
