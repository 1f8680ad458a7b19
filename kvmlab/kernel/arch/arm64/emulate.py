"""What KVM keeps for an arm64 vCPU and VM, and its register accessors (asm/kvm_emulate.h).

The vCPU's registers live in one of two places, as on hardware: in the CPU while the guest
runs (and after, until someone needs them all), or in KVM's saved context `ctxt`, a
`struct kvm_regs`, which ONE_REG reads and writes. `vcpu_get_reg`/`vcpu_set_reg` go to
whichever holds them, so an exit handler touching x0 costs one register access.
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/include/asm/kvm_emulate.h
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmlab.kernel.arch.arm64.hyp import GPRS, R, UcVcpu
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.trace import traced
from kvmlab.uapi import KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED
from kvmlab.uapi.arm64 import kvm_regs

MPIDR_HWID_BITMASK = 0xFF00FFFFFF


@dataclass
class VcpuResetState:
    """vcpu->arch.reset_state: where a PSCI CPU_ON asked this vCPU to start."""

    pc: int = 0
    r0: int = 0
    reset: bool = False


@dataclass
class KvmArchVm:
    """struct kvm_arch for arm64: the IPA size, the vCPU features and the PSCI version."""

    ipa_bits: int
    vcpu_features: int | None = None  # KVM_ARCH_FLAG_VCPU_FEATURES_CONFIGURED once set
    psci_version: int = 0  # 0: the latest KVM implements, unless userspace chose one
    has_ran_once: bool = False


@dataclass
class KvmVcpuStat:
    """arm64's struct kvm_vcpu_stat: the counters KVM_GET_STATS_FD shows on an arm64 host."""

    exits: int = 0
    hvc_exit_stat: int = 0
    wfe_exit_stat: int = 0
    wfi_exit_stat: int = 0
    mmio_exit_user: int = 0
    mmio_exit_kernel: int = 0
    signal_exits: int = 0
    halt_wakeup: int = 0


@dataclass
class KvmVcpuArch:
    """struct kvm_vcpu_arch: the saved context, the init state, power state and requests."""

    hw: UcVcpu
    mpidr: int
    ctxt: kvm_regs = field(default_factory=kvm_regs)
    in_cpu: bool = False  # the CPU holds the live registers; ctxt may be stale
    initialized: bool = False  # VCPU_INITIALIZED: KVM_ARM_VCPU_INIT succeeded
    features: int = 0
    mp_state: int = KVM_MP_STATE_RUNNABLE
    reset_state: VcpuResetState = field(default_factory=VcpuResetState)
    req_vcpu_reset: bool = False  # KVM_REQ_VCPU_RESET
    req_sleep: bool = False  # KVM_REQ_SLEEP
    mmio_needed: bool = False
    has_run_once: bool = False
    irq_lines: int = 0  # HCR_EL2.VI / VF, raised by KVM_IRQ_LINE without an in-kernel GIC


def vcpu_arch(vcpu: KvmVcpu) -> KvmVcpuArch:
    arch: KvmVcpuArch = vcpu.arch
    return arch


def vcpu_stat(vcpu: KvmVcpu) -> KvmVcpuStat:
    stat: KvmVcpuStat = vcpu.stat  # type: ignore[assignment]  # set by kvm_arch_vcpu_create
    return stat


def vcpu_get_reg(vcpu: KvmVcpu, n: int) -> int:
    """xN (x31 reads as zero: XZR)."""
    arch = vcpu_arch(vcpu)
    if n == 31:
        return 0
    return arch.hw.read_reg(GPRS[n]) if arch.in_cpu else int(arch.ctxt.regs.regs[n])


def vcpu_set_reg(vcpu: KvmVcpu, n: int, value: int) -> None:
    """Write xN (writes to x31, XZR, are dropped)."""
    arch = vcpu_arch(vcpu)
    value &= 2**64 - 1
    if n == 31:
        return
    if arch.in_cpu:
        arch.hw.write_reg(GPRS[n], value)
    else:
        arch.ctxt.regs.regs[n] = value


def vcpu_pc(vcpu: KvmVcpu) -> int:
    arch = vcpu_arch(vcpu)
    return arch.hw.read_reg(R.UC_ARM64_REG_PC) if arch.in_cpu else int(arch.ctxt.regs.pc)


def vcpu_set_pc(vcpu: KvmVcpu, pc: int) -> None:
    arch = vcpu_arch(vcpu)
    if arch.in_cpu:
        arch.hw.write_reg(R.UC_ARM64_REG_PC, pc)
    else:
        arch.ctxt.regs.pc = pc


def kvm_incr_pc(vcpu: KvmVcpu) -> None:
    """Step over the instruction KVM just emulated (every AArch64 instruction is 4 bytes)."""
    vcpu_set_pc(vcpu, vcpu_pc(vcpu) + 4)


def vcpu_ctxt(vcpu: KvmVcpu, *, for_write: bool) -> kvm_regs:
    """The saved context, up to date; `for_write` makes it the registers' home again, so the
    next entry loads it into the CPU."""
    arch = vcpu_arch(vcpu)
    if arch.in_cpu:
        arch.hw.save_ctxt(arch.ctxt)
        arch.in_cpu = not for_write
    return arch.ctxt


def smccc_get_function(vcpu: KvmVcpu) -> int:
    return vcpu_get_reg(vcpu, 0) & 0xFFFFFFFF


def smccc_get_arg(vcpu: KvmVcpu, n: int) -> int:
    return vcpu_get_reg(vcpu, n)


def smccc_set_retval(vcpu: KvmVcpu, *values: int) -> None:
    """An SMCCC call returns in x0-x3 (unset ones are 0)."""
    padded = (*values, 0, 0, 0, 0)[:4]
    for n, value in enumerate(padded):
        vcpu_set_reg(vcpu, n, value)


def kvm_arm_vcpu_stopped(vcpu: KvmVcpu) -> bool:
    return vcpu_arch(vcpu).mp_state == KVM_MP_STATE_STOPPED


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_arm_vcpu_power_off(vcpu: KvmVcpu) -> None:
    """Stop the vCPU and make it sleep at its next entry (KVM_REQ_SLEEP)."""
    arch = vcpu_arch(vcpu)
    arch.mp_state = KVM_MP_STATE_STOPPED
    arch.req_sleep = True
    arch.hw.kick()


def kvm_vcpu_get_mpidr_aff(vcpu: KvmVcpu) -> int:
    return vcpu_arch(vcpu).mpidr & MPIDR_HWID_BITMASK


def reset_mpidr(vcpu_id: int) -> int:
    """MPIDR_EL1 KVM gives a vCPU: Aff0 = id[3:0], Aff1 = id[11:4], Aff2 = id[19:12], bit 31."""
    aff = (vcpu_id & 0xF) | ((vcpu_id >> 4) & 0xFF) << 8 | ((vcpu_id >> 12) & 0xFF) << 16
    return 1 << 31 | aff


def run_of(vcpu: KvmVcpu) -> Any:
    """vcpu->run, typed loosely: the arm64 struct kvm_run."""
    return vcpu.run
