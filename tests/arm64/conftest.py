"""Fixtures for the arm64 tests: the arm64 module loaded for them, x86_64 put back after.

There is no arm64 host here: expected values come from upstream arm64 KVM (Linux 6.12
arm.c, guest.c, psci.c, mmio.c, handle_exit.c) and Documentation/virt/kvm/api.rst.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmlab.kernel import kvm_main
from kvmlab.kernel.arch.arm64.arm import kvm_arm_exit, kvm_arm_init

from .harness import Vm


@pytest.fixture(scope="package", autouse=True)
def arm64_module() -> Iterator[None]:
    """Swap the loaded kvm module to arm64 for these tests and back after.

    Other test modules keep a /dev/kvm fd open for the whole session, which makes
    `sys_arm64.modprobe()` fail with EBUSY (the module is in use), so the swap is made in
    the kernel directly, as `rmmod -f` would; those fds are not used while arm64 is loaded.
    """
    x86_ops = kvm_main.kvm_arch_ops
    if x86_ops is not None:
        kvm_main.kvm_exit()
    kvm_arm_init()
    yield
    kvm_arm_exit()
    if x86_ops is not None:
        kvm_main.kvm_init(x86_ops)


@pytest.fixture
def vm() -> Iterator[Vm]:
    machine = Vm()
    try:
        yield machine
    finally:
        machine.close()
