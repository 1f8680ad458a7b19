"""arch/arm64/kvm/guest.c: KVM_GET_ONE_REG, KVM_SET_ONE_REG and KVM_GET_REG_LIST.

A core register id indexes `struct kvm_regs` as an array of 32-bit words; the checks, in the
kernel's order: the id's upper half must say arm64 (EINVAL); its group picks the handler (an
unknown group or system register is ENOENT); the offset must lie inside the struct (ENOENT)
and be a register's start, with the register's own size (EINVAL).
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/guest.c
"""

from __future__ import annotations

import ctypes
import errno

from kvmlab.kernel.arch.arm64.emulate import vcpu_arch, vcpu_ctxt
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.trace import traced
from kvmlab.kernel.uaccess import copy_from_user, copy_to_user, fail
from kvmlab.uapi import kvm_one_reg
from kvmlab.uapi.arm64 import (
    CORE_REG_NAMES,
    KVM_ARM_PSCI_0_1,
    KVM_ARM_PSCI_0_2,
    KVM_ARM_PSCI_1_0,
    KVM_ARM_PSCI_1_1,
    KVM_ARM_PSCI_LATEST,
    KVM_ARM_VCPU_PSCI_0_2,
    KVM_REG_ARCH_MASK,
    KVM_REG_ARM64,
    KVM_REG_ARM_COPROC_MASK,
    KVM_REG_ARM_CORE,
    KVM_REG_ARM_FW,
    KVM_REG_ARM_PSCI_VERSION,
    KVM_REG_SIZE,
    KVM_REG_SIZE_MASK,
    PSR_AA32_MODE_MASK,
    PSR_MODE_EL0t,
    PSR_MODE_EL1h,
    PSR_MODE_EL1t,
    kvm_regs,
    user_pt_regs,
)

NR_CORE_WORDS = ctypes.sizeof(kvm_regs) // 4
PSTATE_WORD = user_pt_regs.pstate.offset // 4
_CORE_SIZES = {id_ & 0xFFFF: KVM_REG_SIZE(id_) for id_ in CORE_REG_NAMES}  # word offset -> size


def core_reg_offset_from_id(id_: int) -> int:
    return id_ & ~(KVM_REG_ARCH_MASK | KVM_REG_SIZE_MASK | KVM_REG_ARM_CORE) & (2**64 - 1)


def core_reg_addr(id_: int) -> int | None:
    """The register's byte offset in struct kvm_regs, or None if the id names no register
    there or gives it the wrong size (-EINVAL)."""
    off = core_reg_offset_from_id(id_)
    size = _CORE_SIZES.get(off)
    if size is None or KVM_REG_SIZE(id_) != size:
        return None
    return off * 4


def _core_reg_bounds(id_: int) -> None:
    off = core_reg_offset_from_id(id_)
    if off >= NR_CORE_WORDS or off + KVM_REG_SIZE(id_) // 4 >= NR_CORE_WORDS:
        fail(errno.ENOENT)


@traced(args=lambda vcpu, reg: {"id": reg.id})
def get_core_reg(vcpu: KvmVcpu, reg: kvm_one_reg) -> None:
    _core_reg_bounds(reg.id)
    addr = core_reg_addr(reg.id)
    if addr is None:
        fail(errno.EINVAL)
    raw = bytes(vcpu_ctxt(vcpu, for_write=False))
    copy_to_user(reg.addr, raw[addr : addr + KVM_REG_SIZE(reg.id)])


@traced(args=lambda vcpu, reg: {"id": reg.id})
def set_core_reg(vcpu: KvmVcpu, reg: kvm_one_reg) -> None:
    """Store a core register; a pstate must name an AArch64 EL0 or EL1 mode (no AArch32, no
    EL2 here), else EINVAL."""
    _core_reg_bounds(reg.id)
    addr = core_reg_addr(reg.id)
    if addr is None:
        fail(errno.EINVAL)
    size = KVM_REG_SIZE(reg.id)
    value = copy_from_user(reg.addr, size)
    if addr == PSTATE_WORD * 4:
        mode = int.from_bytes(value, "little") & PSR_AA32_MODE_MASK
        if mode not in (PSR_MODE_EL0t, PSR_MODE_EL1t, PSR_MODE_EL1h):
            fail(errno.EINVAL)
    ctxt = vcpu_ctxt(vcpu, for_write=True)
    ctypes.memmove(ctypes.addressof(ctxt) + addr, bytes(value), size)


def kvm_psci_version(vcpu: KvmVcpu) -> int:
    """The PSCI version this vCPU's guest sees: 0.1 without the PSCI_0_2 feature; otherwise
    what userspace chose through KVM_REG_ARM_PSCI_VERSION, or the latest (1.1)."""
    arch = vcpu_arch(vcpu)
    if arch.features & (1 << KVM_ARM_VCPU_PSCI_0_2):
        return vcpu.kvm.arch.psci_version or KVM_ARM_PSCI_LATEST
    return KVM_ARM_PSCI_0_1


def kvm_arm_get_fw_reg(vcpu: KvmVcpu, reg: kvm_one_reg) -> None:
    """The firmware pseudo-registers: kvmlab has KVM_REG_ARM_PSCI_VERSION."""
    if reg.id != KVM_REG_ARM_PSCI_VERSION:
        fail(errno.ENOENT)
    copy_to_user(reg.addr, kvm_psci_version(vcpu).to_bytes(8, "little"))


def kvm_arm_set_fw_reg(vcpu: KvmVcpu, reg: kvm_one_reg) -> None:
    """Choose the PSCI version: 0.1 only without the PSCI_0_2 feature, 0.2-1.1 only with it."""
    if reg.id != KVM_REG_ARM_PSCI_VERSION:
        fail(errno.ENOENT)
    val = int.from_bytes(copy_from_user(reg.addr, 8), "little")
    wants_02 = bool(vcpu_arch(vcpu).features & (1 << KVM_ARM_VCPU_PSCI_0_2))
    if val == KVM_ARM_PSCI_0_1 and not wants_02:
        vcpu.kvm.arch.psci_version = val
        return
    if val in (KVM_ARM_PSCI_0_2, KVM_ARM_PSCI_1_0, KVM_ARM_PSCI_1_1) and wants_02:
        vcpu.kvm.arch.psci_version = val
        return
    fail(errno.EINVAL)


def _check_arm64_id(id_: int) -> int:
    if (id_ & ~KVM_REG_SIZE_MASK) >> 32 != KVM_REG_ARM64 >> 32:
        fail(errno.EINVAL)  # nothing arch-specific in the upper 32 bits
    return id_ & KVM_REG_ARM_COPROC_MASK


@traced(args=lambda vcpu, reg: {"id": reg.id})
def kvm_arm_get_reg(vcpu: KvmVcpu, reg: kvm_one_reg) -> None:
    group = _check_arm64_id(reg.id)
    if group == KVM_REG_ARM_CORE:
        get_core_reg(vcpu, reg)
    elif group == KVM_REG_ARM_FW:
        kvm_arm_get_fw_reg(vcpu, reg)
    else:
        fail(errno.ENOENT)  # kvm_arm_sys_reg_get_reg: no such system register here


@traced(args=lambda vcpu, reg: {"id": reg.id})
def kvm_arm_set_reg(vcpu: KvmVcpu, reg: kvm_one_reg) -> None:
    group = _check_arm64_id(reg.id)
    if group == KVM_REG_ARM_CORE:
        set_core_reg(vcpu, reg)
    elif group == KVM_REG_ARM_FW:
        kvm_arm_set_fw_reg(vcpu, reg)
    else:
        fail(errno.ENOENT)


def kvm_arm_reg_indices(vcpu: KvmVcpu) -> list[int]:
    """kvm_arm_copy_reg_indices: the core registers in struct order, then the firmware ones."""
    return [*CORE_REG_NAMES, KVM_REG_ARM_PSCI_VERSION]


def kvm_arm_num_regs(vcpu: KvmVcpu) -> int:
    return len(kvm_arm_reg_indices(vcpu))
