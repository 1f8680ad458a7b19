"""KVM_ARM_PREFERRED_TARGET, KVM_ARM_VCPU_INIT, the reset state, ONE_REG and KVM_GET_REG_LIST."""

from __future__ import annotations

import ctypes
import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlab import sys_arm64 as k
from kvmlab.uapi import (
    KVM_CAP_ARM_PSCI_0_2,
    KVM_CHECK_EXTENSION,
    KVM_GET_MP_STATE,
    KVM_GET_REG_LIST,
    KVM_GET_REGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_STOPPED,
    KVM_RUN,
    KVM_SET_TSS_ADDR,
    kvm_mp_state,
    kvm_reg_list,
)
from kvmlab.uapi.arm64 import (
    CORE_REG_NAMES,
    KVM_ARM_PREFERRED_TARGET,
    KVM_ARM_PSCI_0_2,
    KVM_ARM_PSCI_1_1,
    KVM_ARM_TARGET_CORTEX_A57,
    KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_SVE,
    KVM_REG_ARM_CORE_REG_X,
    KVM_REG_ARM_PSCI_VERSION,
    KVM_REG_SIZE,
    REG_FPCR,
    REG_PSTATE,
    kvm_vcpu_init,
)

from .harness import PSCI, Vm


def errno_of(call: object) -> str:
    with pytest.raises(OSError) as caught:
        call()  # type: ignore[operator]
    return errno.errorcode[caught.value.errno]


def test_preferred_target_is_generic_v8_with_no_features(vm: Vm) -> None:
    init = kvm_vcpu_init(target=99)
    init.features[0] = 0xFF
    k.ioctl(vm.fd, KVM_ARM_PREFERRED_TARGET, init)
    assert (init.target, list(init.features)) == (5, [0] * 7)


def test_arm64_answers_unknown_vm_ioctls_with_einval_and_has_two_mmap_pages(vm: Vm) -> None:
    assert errno_of(lambda: k.ioctl(vm.fd, KVM_SET_TSS_ADDR, 0)) == "EINVAL"  # x86: ENOTTY
    assert k.ioctl(vm.kvm, KVM_GET_VCPU_MMAP_SIZE, 0) == 2 * 4096
    assert k.ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_PSCI_0_2) == 1


@pytest.mark.parametrize(
    ("target", "features", "features1", "expected"),
    [
        (KVM_ARM_TARGET_CORTEX_A57, PSCI, 0, "EINVAL"),  # only GENERIC_V8 is accepted
        (5, 1 << 8, 0, "ENOENT"),  # a feature bit KVM does not define
        (5, PSCI, 1, "ENOENT"),  # features[1..6] must be zero
        (5, 1 << KVM_ARM_VCPU_SVE, 0, "EINVAL"),  # defined, but this CPU has no SVE
    ],
)
def test_vcpu_init_refuses(
    vm: Vm, target: int, features: int, features1: int, expected: str
) -> None:
    vcpu = vm.vcpu(features=None)
    init = kvm_vcpu_init(target=target)
    init.features[0], init.features[1] = features, features1
    from kvmlab.uapi.arm64 import KVM_ARM_VCPU_INIT

    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_ARM_VCPU_INIT, init)) == expected


def test_every_vcpu_must_ask_for_the_vms_features_but_power_off_is_per_call(vm: Vm) -> None:
    vm.vcpu(0, PSCI)
    vm.vcpu(1, PSCI | 1 << KVM_ARM_VCPU_POWER_OFF)  # POWER_OFF is not a VM-wide feature
    assert errno_of(lambda: vm.vcpu(2, 0)) == "EINVAL"


def test_before_init_run_one_reg_and_reg_list_are_enoexec(vm: Vm) -> None:
    vcpu = vm.vcpu(features=None)
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_RUN, 0)) == "ENOEXEC"
    assert errno_of(lambda: vcpu.get(REG_PSTATE)) == "ENOEXEC"
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_GET_REG_LIST, kvm_reg_list())) == "ENOEXEC"
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_GET_REGS, bytearray(144))) == "EINVAL"


def test_reset_state_is_el1h_with_daif_masked_and_everything_else_zero(vm: Vm) -> None:
    vcpu = vm.vcpu()
    values = {name: vcpu.get(id_) for id_, name in CORE_REG_NAMES.items()}
    assert values.pop("pstate") == 0x3C5
    assert set(values.values()) == {0}
    state = kvm_mp_state()
    k.ioctl(vcpu.fd, KVM_GET_MP_STATE, state)
    assert state.mp_state == KVM_MP_STATE_RUNNABLE
    stopped = vm.vcpu(1, PSCI | 1 << KVM_ARM_VCPU_POWER_OFF)
    k.ioctl(stopped.fd, KVM_GET_MP_STATE, state)
    assert state.mp_state == KVM_MP_STATE_STOPPED


def test_reinit_resets_the_registers(vm: Vm) -> None:
    vcpu = vm.vcpu()
    vcpu.set(KVM_REG_ARM_CORE_REG_X(7), 0x1234)
    vcpu.init(PSCI)
    assert vcpu.x(7) == 0


@pytest.mark.parametrize(
    ("id_", "expected"),
    [
        (0x6130_0000_0010_0000, "EINVAL"),  # not KVM_REG_ARM64 in the upper half
        (0x6030_0000_0010_00D8, "ENOENT"),  # beyond struct kvm_regs
        (0x6020_0000_0010_0000, "EINVAL"),  # x0 is 64-bit, not 32
        (0x6030_0000_0010_0001, "EINVAL"),  # the middle of x0
        (0x6030_0000_0013_C000, "ENOENT"),  # a system register kvmlab does not have
        (0x6030_0000_0015_0000, "ENOENT"),  # SVE, not enabled
    ],
)
def test_one_reg_bad_ids(vm: Vm, id_: int, expected: str) -> None:
    vcpu = vm.vcpu()
    assert errno_of(lambda: vcpu.get(id_)) == expected
    assert errno_of(lambda: vcpu.set(id_, 0)) == expected


@pytest.mark.parametrize("mode", [0x9, 0x10, 0x13, 0x2])  # EL2h, AArch32 usr and svc, junk
def test_pstate_must_name_an_aarch64_el0_or_el1_mode(vm: Vm, mode: int) -> None:
    vcpu = vm.vcpu()
    assert errno_of(lambda: vcpu.set(REG_PSTATE, 0x3C0 | mode)) == "EINVAL"
    assert vcpu.get(REG_PSTATE) == 0x3C5


def test_reg_list_says_e2big_with_the_count_then_lists_core_and_firmware_ids(vm: Vm) -> None:
    vcpu = vm.vcpu()
    header = kvm_reg_list(n=3)
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_GET_REG_LIST, header)) == "E2BIG"
    assert header.n == 76
    buf = (ctypes.c_uint64 * 77)(76)
    k.ioctl(vcpu.fd, KVM_GET_REG_LIST, buf)
    assert list(buf[1:]) == [*CORE_REG_NAMES, KVM_REG_ARM_PSCI_VERSION]
    assert buf[1] == 0x6030_0000_0010_0000 and buf[76] == 0x6030_0000_0014_0000


def test_psci_version_register(vm: Vm) -> None:
    vcpu = vm.vcpu()
    assert vcpu.get(KVM_REG_ARM_PSCI_VERSION) == KVM_ARM_PSCI_1_1
    assert errno_of(lambda: vcpu.set(KVM_REG_ARM_PSCI_VERSION, 1)) == "EINVAL"  # 0.1 needs no 0.2
    vcpu.set(KVM_REG_ARM_PSCI_VERSION, KVM_ARM_PSCI_0_2)
    assert vcpu.get(KVM_REG_ARM_PSCI_VERSION) == KVM_ARM_PSCI_0_2


_PLAIN = [id_ for id_ in CORE_REG_NAMES if id_ != REG_PSTATE]


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(0, len(_PLAIN) - 1),
    value=st.integers(0, 2**128 - 1),
    flags=st.integers(0, 2**32 - 1),
    mode=st.sampled_from([0x0, 0x4, 0x5]),
)
def test_one_reg_round_trips(index: int, value: int, flags: int, mode: int) -> None:
    """Any core register keeps exactly what was written, in its own size (fpcr too: KVM
    stores the value; only the CPU masks it once it runs)."""
    machine = Vm()
    try:
        vcpu = machine.vcpu()
        id_ = _PLAIN[index]
        value &= (1 << (8 * KVM_REG_SIZE(id_))) - 1
        vcpu.set(id_, value)
        vcpu.set(REG_PSTATE, (flags & ~0x1F) | mode)
        assert vcpu.get(id_) == value
        assert vcpu.get(REG_PSTATE) == (flags & ~0x1F) | mode
        others = [other for other in _PLAIN if other != id_]
        assert all(vcpu.get(other) == 0 for other in others[:: max(len(others) // 8, 1)])
    finally:
        machine.close()


def test_fpcr_is_masked_by_the_cpu_once_it_ran(vm: Vm) -> None:
    vcpu = vm.vcpu()
    vm.load("ldr x0, =0x84000008\nhvc #0")
    vcpu.set(0x6030_0000_0010_0040, 0x40000000)
    vcpu.set(REG_FPCR, 0xFFFFFFFF, 4)
    assert vcpu.get(REG_FPCR) == 0xFFFFFFFF
    vcpu.run()
    assert vcpu.get(REG_FPCR) == 0x07F70000
