"""arch/arm64/kvm/psci.c and hypercalls.c: the firmware calls a guest makes with `hvc #0`.

The function id is in w0, arguments in x1-x3, the answer goes back in x0. SYSTEM_OFF and
SYSTEM_RESET stop every vCPU and exit to userspace with KVM_EXIT_SYSTEM_EVENT; CPU_ON wakes a
stopped vCPU at an entry point with a context id in x0; everything else is answered in x0.
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/psci.c
"""

from __future__ import annotations

from kvmlab.kernel.arch.arm64.emulate import (
    MPIDR_HWID_BITMASK,
    kvm_arm_vcpu_power_off,
    kvm_arm_vcpu_stopped,
    kvm_vcpu_get_mpidr_aff,
    run_of,
    smccc_get_arg,
    smccc_get_function,
    smccc_set_retval,
    vcpu_arch,
    vcpu_set_reg,
)
from kvmlab.kernel.arch.arm64.guest import kvm_psci_version
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.trace import note, traced
from kvmlab.uapi import (
    KVM_EXIT_SYSTEM_EVENT,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_STOPPED,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
)
from kvmlab.uapi.arm64 import (
    ARM_SMCCC_ARCH_FEATURES_FUNC_ID,
    ARM_SMCCC_VERSION_1_1,
    ARM_SMCCC_VERSION_FUNC_ID,
    KVM_ARM_PSCI_0_1,
    KVM_ARM_PSCI_0_2,
    KVM_ARM_PSCI_1_1,
    KVM_PSCI_FN_CPU_OFF,
    KVM_PSCI_FN_CPU_ON,
    KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2,
    PSCI_0_2_AFFINITY_LEVEL_OFF,
    PSCI_0_2_AFFINITY_LEVEL_ON,
    PSCI_0_2_FN64_AFFINITY_INFO,
    PSCI_0_2_FN64_CPU_ON,
    PSCI_0_2_FN64_CPU_SUSPEND,
    PSCI_0_2_FN_AFFINITY_INFO,
    PSCI_0_2_FN_CPU_OFF,
    PSCI_0_2_FN_CPU_ON,
    PSCI_0_2_FN_CPU_SUSPEND,
    PSCI_0_2_FN_MIGRATE_INFO_TYPE,
    PSCI_0_2_FN_PSCI_VERSION,
    PSCI_0_2_FN_SYSTEM_OFF,
    PSCI_0_2_FN_SYSTEM_RESET,
    PSCI_0_2_TOS_MP,
    PSCI_1_0_FN_PSCI_FEATURES,
    PSCI_1_1_FN64_SYSTEM_RESET2,
    PSCI_1_1_FN_SYSTEM_RESET2,
    PSCI_1_1_RESET_TYPE_SYSTEM_WARM_RESET,
    PSCI_1_1_RESET_TYPE_VENDOR_START,
    PSCI_RET_ALREADY_ON,
    PSCI_RET_INTERNAL_FAILURE,
    PSCI_RET_INVALID_PARAMS,
    PSCI_RET_NOT_SUPPORTED,
    PSCI_RET_SUCCESS,
)

_U64 = 2**64 - 1
# What PSCI_FEATURES says is implemented (SYSTEM_SUSPEND needs a VM capability kvmlab lacks).
_PSCI_1_0_FEATURES = frozenset(
    {
        PSCI_0_2_FN_PSCI_VERSION,
        PSCI_0_2_FN_CPU_SUSPEND,
        PSCI_0_2_FN64_CPU_SUSPEND,
        PSCI_0_2_FN_CPU_OFF,
        PSCI_0_2_FN_CPU_ON,
        PSCI_0_2_FN64_CPU_ON,
        PSCI_0_2_FN_AFFINITY_INFO,
        PSCI_0_2_FN64_AFFINITY_INFO,
        PSCI_0_2_FN_MIGRATE_INFO_TYPE,
        PSCI_0_2_FN_SYSTEM_OFF,
        PSCI_0_2_FN_SYSTEM_RESET,
        PSCI_1_0_FN_PSCI_FEATURES,
        ARM_SMCCC_VERSION_FUNC_ID,
    }
)


@traced(args=lambda vcpu: {"fn": smccc_get_function(vcpu)})
def kvm_smccc_call_handler(vcpu: KvmVcpu) -> int:
    """SMCCC calls: the SMCCC version and features here, PSCI in kvm_psci_call."""
    func_id = smccc_get_function(vcpu)
    if func_id == ARM_SMCCC_VERSION_FUNC_ID:
        smccc_set_retval(vcpu, ARM_SMCCC_VERSION_1_1)
        return 1
    if func_id == ARM_SMCCC_ARCH_FEATURES_FUNC_ID:
        smccc_set_retval(vcpu, PSCI_RET_NOT_SUPPORTED & _U64)  # no workarounds to offer
        return 1
    return kvm_psci_call(vcpu)


@traced(args=lambda vcpu: {"version": hex(kvm_psci_version(vcpu))})
def kvm_psci_call(vcpu: KvmVcpu) -> int:
    """Dispatch on the PSCI version the vCPU has (0.1 without the PSCI_0_2 feature)."""
    version = kvm_psci_version(vcpu)
    if version == KVM_ARM_PSCI_0_1:
        return kvm_psci_0_1_call(vcpu)
    if version == KVM_ARM_PSCI_0_2:
        return kvm_psci_0_2_call(vcpu)
    return kvm_psci_1_x_call(vcpu, 1 if version == KVM_ARM_PSCI_1_1 else 0)


def kvm_psci_0_1_call(vcpu: KvmVcpu) -> int:
    """PSCI 0.1: only KVM's own CPU_OFF and CPU_ON ids."""
    fn = smccc_get_function(vcpu)
    if fn == KVM_PSCI_FN_CPU_OFF:
        kvm_arm_vcpu_power_off(vcpu)
        val = PSCI_RET_SUCCESS
    elif fn == KVM_PSCI_FN_CPU_ON:
        val = kvm_psci_vcpu_on(vcpu)
    else:
        val = PSCI_RET_NOT_SUPPORTED
    smccc_set_retval(vcpu, val & _U64)
    return 1


def kvm_psci_0_2_call(vcpu: KvmVcpu) -> int:
    fn = smccc_get_function(vcpu)
    ret = 1
    if fn == PSCI_0_2_FN_PSCI_VERSION:
        val = KVM_ARM_PSCI_0_2
    elif fn in (PSCI_0_2_FN_CPU_SUSPEND, PSCI_0_2_FN64_CPU_SUSPEND):
        val = PSCI_RET_SUCCESS  # kvm_psci_vcpu_suspend: a WFI; returning at once is allowed
    elif fn == PSCI_0_2_FN_CPU_OFF:
        kvm_arm_vcpu_power_off(vcpu)
        val = PSCI_RET_SUCCESS
    elif fn in (PSCI_0_2_FN_CPU_ON, PSCI_0_2_FN64_CPU_ON):
        if fn == PSCI_0_2_FN_CPU_ON:
            kvm_psci_narrow_to_32bit(vcpu)
        val = kvm_psci_vcpu_on(vcpu)
    elif fn in (PSCI_0_2_FN_AFFINITY_INFO, PSCI_0_2_FN64_AFFINITY_INFO):
        if fn == PSCI_0_2_FN_AFFINITY_INFO:
            kvm_psci_narrow_to_32bit(vcpu)
        val = kvm_psci_vcpu_affinity_info(vcpu)
    elif fn == PSCI_0_2_FN_MIGRATE_INFO_TYPE:
        val = PSCI_0_2_TOS_MP
    elif fn == PSCI_0_2_FN_SYSTEM_OFF:
        kvm_prepare_system_event(vcpu, KVM_SYSTEM_EVENT_SHUTDOWN, 0)
        val, ret = PSCI_RET_INTERNAL_FAILURE, 0  # what the guest sees if it is run again
    elif fn == PSCI_0_2_FN_SYSTEM_RESET:
        kvm_prepare_system_event(vcpu, KVM_SYSTEM_EVENT_RESET, 0)
        val, ret = PSCI_RET_INTERNAL_FAILURE, 0
    else:
        val = PSCI_RET_NOT_SUPPORTED
    smccc_set_retval(vcpu, val & _U64)
    return ret


def kvm_psci_1_x_call(vcpu: KvmVcpu, minor: int) -> int:
    """PSCI 1.0/1.1: PSCI_FEATURES and SYSTEM_RESET2 on top of 0.2."""
    fn = smccc_get_function(vcpu)
    if fn == PSCI_0_2_FN_PSCI_VERSION:
        val = (1 << 16) | minor
    elif fn == PSCI_1_0_FN_PSCI_FEATURES:
        arg = smccc_get_arg(vcpu, 1) & 0xFFFFFFFF
        reset2 = arg in (PSCI_1_1_FN_SYSTEM_RESET2, PSCI_1_1_FN64_SYSTEM_RESET2) and minor >= 1
        val = 0 if arg in _PSCI_1_0_FEATURES or reset2 else PSCI_RET_NOT_SUPPORTED
    elif fn in (PSCI_1_1_FN_SYSTEM_RESET2, PSCI_1_1_FN64_SYSTEM_RESET2) and minor >= 1:
        if fn == PSCI_1_1_FN_SYSTEM_RESET2:
            kvm_psci_narrow_to_32bit(vcpu)
        arg = smccc_get_arg(vcpu, 1)
        if arg <= PSCI_1_1_RESET_TYPE_SYSTEM_WARM_RESET or arg >= PSCI_1_1_RESET_TYPE_VENDOR_START:
            kvm_prepare_system_event(
                vcpu, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2
            )
            vcpu_set_reg(vcpu, 0, PSCI_RET_INTERNAL_FAILURE)
            return 0
        val = PSCI_RET_INVALID_PARAMS
    else:
        return kvm_psci_0_2_call(vcpu)
    smccc_set_retval(vcpu, val & _U64)
    return 1


def kvm_psci_narrow_to_32bit(vcpu: KvmVcpu) -> None:
    """An SMC32/HVC32 function's arguments are 32-bit: clear the upper halves of x1-x3."""
    for n in (1, 2, 3):
        vcpu_set_reg(vcpu, n, smccc_get_arg(vcpu, n) & 0xFFFFFFFF)


def kvm_mpidr_to_vcpu(vcpu: KvmVcpu, mpidr: int) -> KvmVcpu | None:
    for other in vcpu.kvm.vcpu_array:
        if kvm_vcpu_get_mpidr_aff(other) == mpidr & MPIDR_HWID_BITMASK:
            return other
    return None


@traced(args=lambda vcpu: {"target": smccc_get_arg(vcpu, 1), "entry": smccc_get_arg(vcpu, 2)})
def kvm_psci_vcpu_on(source: KvmVcpu) -> int:
    """CPU_ON(target MPIDR, entry point, context id): wake a stopped vCPU there, x0 = id."""
    cpu_id = smccc_get_arg(source, 1)
    if cpu_id & ~MPIDR_HWID_BITMASK:
        return PSCI_RET_INVALID_PARAMS
    target = kvm_mpidr_to_vcpu(source, cpu_id)
    if target is None:
        return PSCI_RET_INVALID_PARAMS
    arch = vcpu_arch(target)
    with arch.hw.wake:  # mp_state_lock
        if not kvm_arm_vcpu_stopped(target):
            note("target is not stopped", target=target.vcpu_id)
            if kvm_psci_version(source) != KVM_ARM_PSCI_0_1:
                return PSCI_RET_ALREADY_ON
            return PSCI_RET_INVALID_PARAMS
        reset_state = arch.reset_state
        reset_state.pc = smccc_get_arg(source, 2)
        reset_state.r0 = smccc_get_arg(source, 3)
        reset_state.reset = True
        arch.req_vcpu_reset = True  # KVM_REQ_VCPU_RESET
        arch.mp_state = KVM_MP_STATE_RUNNABLE
        arch.hw.wake.notify_all()  # kvm_vcpu_wake_up
    return PSCI_RET_SUCCESS


def kvm_psci_vcpu_affinity_info(vcpu: KvmVcpu) -> int:
    """ON if any vCPU matching the target affinity (at the given level) is running."""
    target = smccc_get_arg(vcpu, 1)
    level = smccc_get_arg(vcpu, 2)
    if target & ~MPIDR_HWID_BITMASK or level > 3:
        return PSCI_RET_INVALID_PARAMS
    mask = MPIDR_HWID_BITMASK & ~((1 << (((1 << level) >> 1) << 3)) - 1)
    target &= mask
    matching = [v for v in vcpu.kvm.vcpu_array if kvm_vcpu_get_mpidr_aff(v) & mask == target]
    if not matching:
        return PSCI_RET_INVALID_PARAMS
    if any(not kvm_arm_vcpu_stopped(v) for v in matching):
        return PSCI_0_2_AFFINITY_LEVEL_ON
    return PSCI_0_2_AFFINITY_LEVEL_OFF


@traced(args=lambda vcpu, type_, flags: {"type": type_})
def kvm_prepare_system_event(vcpu: KvmVcpu, type_: int, flags: int) -> None:
    """Stop every vCPU (they sleep if run again), and fill KVM_EXIT_SYSTEM_EVENT."""
    for other in vcpu.kvm.vcpu_array:
        arch = vcpu_arch(other)
        with arch.hw.wake:
            arch.mp_state = KVM_MP_STATE_STOPPED
            arch.req_sleep = True
        if other is not vcpu:
            arch.hw.kick()
    run = run_of(vcpu)
    run.system_event.type = type_
    run.system_event.ndata = 1
    for i in range(16):
        run.system_event.data[i] = 0
    run.system_event.data[0] = flags
    run.exit_reason = KVM_EXIT_SYSTEM_EVENT
