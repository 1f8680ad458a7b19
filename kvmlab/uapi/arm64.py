"""<asm/kvm.h> for arm64: registers as ONE_REG ids, vCPU init, PSCI, and the arm64 `kvm_run`.

arm64 has no KVM_GET_REGS: every register is read and written one at a time by a 64-bit id
(KVM_GET_ONE_REG / KVM_SET_ONE_REG). A core register's id is its offset in `struct kvm_regs`
counted in 32-bit words, tagged with the architecture, the size and the "core" group:

    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offsetof(struct kvm_regs, regs.pc) / 4

https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/include/uapi/asm/kvm.h
https://docs.kernel.org/virt/kvm/api.html#kvm-set-one-reg (the arm64 id table)
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint32, c_uint64

from kvmlab.uapi.ioctl import _IOR, _IOW
from kvmlab.uapi.kvm import KVMIO, make_kvm_run

# --- ONE_REG id encoding (<linux/kvm.h> generic part, arm64 values) ------------------------
KVM_REG_ARCH_MASK = 0xFF00_0000_0000_0000
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0_0000_0000_0000
KVM_REG_SIZE_U32 = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_SIZE_U128 = 0x0040_0000_0000_0000
KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_COPROC_MASK = 0x0000_0000_0FFF_0000
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_DEMUX = 0x0011 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SVE = 0x0015 << KVM_REG_ARM_COPROC_SHIFT


def KVM_REG_SIZE(id_: int) -> int:  # noqa: N802 (the C macro)
    """The size in bytes a register id says its value has (1 << bits 55:52)."""
    return 1 << ((id_ & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


# --- struct kvm_regs (only ever addressed through ONE_REG ids) -------------------------------
KVM_NR_SPSR = 5
KVM_SPSR_EL1 = 0


class user_pt_regs(ctypes.Structure):  # noqa: N801 (kernel name)
    """The general-purpose state: x0-x30, sp (SP_EL0), pc and pstate."""

    _fields_ = [("regs", c_uint64 * 31), ("sp", c_uint64), ("pc", c_uint64), ("pstate", c_uint64)]


class user_fpsimd_state(ctypes.Structure):  # noqa: N801
    """The 32 128-bit vector registers (as pairs of u64, low half first), fpsr and fpcr."""

    _fields_ = [
        ("vregs", (c_uint64 * 2) * 32),
        ("fpsr", c_uint32),
        ("fpcr", c_uint32),
        ("__reserved", c_uint32 * 2),
    ]


class kvm_regs(ctypes.Structure):  # noqa: N801
    """arm64 struct kvm_regs (864 bytes): what KVM_REG_ARM_CORE ids index, in 32-bit words."""

    _fields_ = [
        ("regs", user_pt_regs),
        ("sp_el1", c_uint64),
        ("elr_el1", c_uint64),
        ("spsr", c_uint64 * KVM_NR_SPSR),
        ("__pad", c_uint64),  # fp_regs is 16-byte aligned (__uint128_t)
        ("fp_regs", user_fpsimd_state),
    ]


def _core(offset: int, size: int = KVM_REG_SIZE_U64) -> int:
    return KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | offset // 4


_FP = kvm_regs.fp_regs.offset


def KVM_REG_ARM_CORE_REG_X(n: int) -> int:  # noqa: N802
    """The id of xN (n = 0..30)."""
    return _core(kvm_regs.regs.offset + user_pt_regs.regs.offset + 8 * n)


def KVM_REG_ARM_CORE_REG_V(n: int) -> int:  # noqa: N802
    """The id of the 128-bit vector register vN (n = 0..31)."""
    return _core(_FP + user_fpsimd_state.vregs.offset + 16 * n, KVM_REG_SIZE_U128)


def KVM_REG_ARM_CORE_REG_SPSR(n: int) -> int:  # noqa: N802
    """The id of spsr[n]: 0 = SPSR_EL1, 1-4 = the AArch32 abt/und/irq/fiq banks."""
    return _core(kvm_regs.spsr.offset + 8 * n)


REG_SP = _core(user_pt_regs.sp.offset)
REG_PC = _core(user_pt_regs.pc.offset)
REG_PSTATE = _core(user_pt_regs.pstate.offset)
REG_SP_EL1 = _core(kvm_regs.sp_el1.offset)
REG_ELR_EL1 = _core(kvm_regs.elr_el1.offset)
REG_FPSR = _core(_FP + user_fpsimd_state.fpsr.offset, KVM_REG_SIZE_U32)
REG_FPCR = _core(_FP + user_fpsimd_state.fpcr.offset, KVM_REG_SIZE_U32)

CORE_REG_NAMES: dict[int, str] = {
    **{KVM_REG_ARM_CORE_REG_X(n): f"x{n}" for n in range(31)},
    REG_SP: "sp",
    REG_PC: "pc",
    REG_PSTATE: "pstate",
    REG_SP_EL1: "sp_el1",
    REG_ELR_EL1: "elr_el1",
    **{KVM_REG_ARM_CORE_REG_SPSR(n): f"spsr[{n}]" for n in range(KVM_NR_SPSR)},
    **{KVM_REG_ARM_CORE_REG_V(n): f"v{n}" for n in range(32)},
    REG_FPSR: "fpsr",
    REG_FPCR: "fpcr",
}
"""Every core register's id and name, in `struct kvm_regs` order (KVM_GET_REG_LIST's order)."""

# --- firmware pseudo-registers ---------------------------------------------------------------
KVM_REG_ARM_PSCI_VERSION = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | 0

# --- pstate ------------------------------------------------------------------------------------
PSR_MODE_EL0t = 0x0  # (kernel names: EL0 with SP_EL0, EL1 with SP_EL0 or SP_EL1, ...)
PSR_MODE_EL1t = 0x4
PSR_MODE_EL1h = 0x5
PSR_MODE_EL2t = 0x8
PSR_MODE_EL2h = 0x9
PSR_MODE32_BIT = 0x10
PSR_MODE_MASK = 0x0F
PSR_AA32_MODE_MASK = 0x1F
PSR_F_BIT = 0x40
PSR_I_BIT = 0x80
PSR_A_BIT = 0x100
PSR_D_BIT = 0x200

# --- vCPU init ---------------------------------------------------------------------------------
KVM_ARM_TARGET_AEM_V8 = 0
KVM_ARM_TARGET_FOUNDATION_V8 = 1
KVM_ARM_TARGET_CORTEX_A57 = 2
KVM_ARM_TARGET_XGENE_POTENZA = 3
KVM_ARM_TARGET_CORTEX_A53 = 4
KVM_ARM_TARGET_GENERIC_V8 = 5  # the only target recent kernels name or accept

KVM_ARM_VCPU_POWER_OFF = 0  # start stopped: a PSCI CPU_ON from another vCPU starts it
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_ARM_VCPU_SVE = 4
KVM_ARM_VCPU_PTRAUTH_ADDRESS = 5
KVM_ARM_VCPU_PTRAUTH_GENERIC = 6
KVM_ARM_VCPU_HAS_EL2 = 7


class kvm_vcpu_init(ctypes.Structure):  # noqa: N801
    """KVM_ARM_VCPU_INIT / KVM_ARM_PREFERRED_TARGET: the CPU target and feature bits."""

    _fields_ = [("target", c_uint32), ("features", c_uint32 * 7)]


class kvm_debug_exit_arch(ctypes.Structure):  # noqa: N801
    """kvm_run.debug.arch on arm64: the exception syndrome (ESR) and fault address."""

    _fields_ = [("hsr", c_uint32), ("hsr_high", c_uint32), ("far", c_uint64)]


class kvm_sync_regs(ctypes.Structure):  # noqa: N801
    """kvm_run.s.regs on arm64: the in-kernel timer/PMU output lines (KVM_CAP_ARM_USER_IRQ)."""

    _fields_ = [("device_irq_level", c_uint64)]


kvm_run = make_kvm_run(kvm_debug_exit_arch, kvm_sync_regs)

KVM_ARM_VCPU_INIT = _IOW(KVMIO, 0xAE, ctypes.sizeof(kvm_vcpu_init))
KVM_ARM_PREFERRED_TARGET = _IOR(KVMIO, 0xAF, ctypes.sizeof(kvm_vcpu_init))

# --- KVM_IRQ_LINE without an in-kernel GIC: vcpu_index and IRQ or FIQ -----------------------
KVM_ARM_IRQ_VCPU2_SHIFT = 28
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_VCPU_SHIFT = 16
KVM_ARM_IRQ_TYPE_CPU = 0
KVM_ARM_IRQ_TYPE_SPI = 1
KVM_ARM_IRQ_TYPE_PPI = 2
KVM_ARM_IRQ_CPU_IRQ = 0
KVM_ARM_IRQ_CPU_FIQ = 1

# --- PSCI (<uapi/linux/psci.h>) and SMCCC function ids, passed in x0 through `hvc #0` ----------
PSCI_0_2_FN_BASE = 0x84000000
PSCI_0_2_64BIT = 0x40000000
PSCI_0_2_FN64_BASE = PSCI_0_2_FN_BASE + PSCI_0_2_64BIT
PSCI_0_2_FN_PSCI_VERSION = PSCI_0_2_FN_BASE + 0
PSCI_0_2_FN_CPU_SUSPEND = PSCI_0_2_FN_BASE + 1
PSCI_0_2_FN_CPU_OFF = PSCI_0_2_FN_BASE + 2
PSCI_0_2_FN_CPU_ON = PSCI_0_2_FN_BASE + 3
PSCI_0_2_FN_AFFINITY_INFO = PSCI_0_2_FN_BASE + 4
PSCI_0_2_FN_MIGRATE = PSCI_0_2_FN_BASE + 5
PSCI_0_2_FN_MIGRATE_INFO_TYPE = PSCI_0_2_FN_BASE + 6
PSCI_0_2_FN_MIGRATE_INFO_UP_CPU = PSCI_0_2_FN_BASE + 7
PSCI_0_2_FN_SYSTEM_OFF = PSCI_0_2_FN_BASE + 8
PSCI_0_2_FN_SYSTEM_RESET = PSCI_0_2_FN_BASE + 9
PSCI_1_0_FN_PSCI_FEATURES = PSCI_0_2_FN_BASE + 10
PSCI_1_0_FN_SYSTEM_SUSPEND = PSCI_0_2_FN_BASE + 14
PSCI_1_1_FN_SYSTEM_RESET2 = PSCI_0_2_FN_BASE + 18
PSCI_0_2_FN64_CPU_SUSPEND = PSCI_0_2_FN64_BASE + 1
PSCI_0_2_FN64_CPU_ON = PSCI_0_2_FN64_BASE + 3
PSCI_0_2_FN64_AFFINITY_INFO = PSCI_0_2_FN64_BASE + 4
PSCI_1_0_FN64_SYSTEM_SUSPEND = PSCI_0_2_FN64_BASE + 14
PSCI_1_1_FN64_SYSTEM_RESET2 = PSCI_0_2_FN64_BASE + 18
ARM_SMCCC_VERSION_FUNC_ID = 0x80000000
ARM_SMCCC_ARCH_FEATURES_FUNC_ID = 0x80000001
ARM_SMCCC_VERSION_1_1 = 0x10001
# PSCI 0.1 had no standard ids: KVM made up its own (KVM_PSCI_FN_*)
KVM_PSCI_FN_BASE = 0x95C1BA5E
KVM_PSCI_FN_CPU_SUSPEND = KVM_PSCI_FN_BASE + 0
KVM_PSCI_FN_CPU_OFF = KVM_PSCI_FN_BASE + 1
KVM_PSCI_FN_CPU_ON = KVM_PSCI_FN_BASE + 2
KVM_PSCI_FN_MIGRATE = KVM_PSCI_FN_BASE + 3

PSCI_RET_SUCCESS = 0
PSCI_RET_NOT_SUPPORTED = -1
PSCI_RET_INVALID_PARAMS = -2
PSCI_RET_DENIED = -3
PSCI_RET_ALREADY_ON = -4
PSCI_RET_INTERNAL_FAILURE = -6
PSCI_0_2_AFFINITY_LEVEL_ON = 0
PSCI_0_2_AFFINITY_LEVEL_OFF = 1
PSCI_0_2_TOS_MP = 2
PSCI_1_1_RESET_TYPE_SYSTEM_WARM_RESET = 0
PSCI_1_1_RESET_TYPE_VENDOR_START = 0x80000000


def PSCI_VERSION(major: int, minor: int) -> int:  # noqa: N802
    """A PSCI version as PSCI_VERSION returns it: major in bits 31:16, minor in 15:0."""
    return (major << 16) | minor


KVM_ARM_PSCI_0_1 = PSCI_VERSION(0, 1)
KVM_ARM_PSCI_0_2 = PSCI_VERSION(0, 2)
KVM_ARM_PSCI_1_0 = PSCI_VERSION(1, 0)
KVM_ARM_PSCI_1_1 = PSCI_VERSION(1, 1)
KVM_ARM_PSCI_LATEST = KVM_ARM_PSCI_1_1

KVM_SYSTEM_EVENT_RESET_FLAG_PSCI_RESET2 = 1 << 0

ARM64_IOCTL_NAMES = {
    KVM_ARM_VCPU_INIT: "KVM_ARM_VCPU_INIT",
    KVM_ARM_PREFERRED_TARGET: "KVM_ARM_PREFERRED_TARGET",
}
"""The arm64-only ioctls by name, for traces (`kvmlab.uapi.ioctl_name`)."""
