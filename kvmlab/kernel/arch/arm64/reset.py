"""arch/arm64/kvm/reset.c: the state a vCPU has after KVM_ARM_VCPU_INIT or a PSCI CPU_ON.

https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/reset.c
"""

from __future__ import annotations

from kvmlab.kernel.arch.arm64.emulate import vcpu_arch, vcpu_set_reg
from kvmlab.kernel.arch.arm64.hyp import SCTLR_EL1, R
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.trace import note, traced
from kvmlab.uapi.arm64 import (
    PSR_A_BIT,
    PSR_D_BIT,
    PSR_F_BIT,
    PSR_I_BIT,
    PSR_MODE_EL1h,
    kvm_regs,
)

VCPU_RESET_PSTATE_EL1 = PSR_MODE_EL1h | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT | PSR_D_BIT  # 0x3c5
SCTLR_EL1_RESET = 0x30D00800  # RES1 bits only: MMU, caches and alignment checks off


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_reset_vcpu(vcpu: KvmVcpu) -> None:
    """Zero every register, EL1h with DAIF masked, EL1 system registers at their warm reset;
    then, if a PSCI CPU_ON asked for it, start at its entry point with its context id in x0."""
    arch = vcpu_arch(vcpu)
    arch.ctxt = kvm_regs()
    arch.ctxt.regs.pstate = VCPU_RESET_PSTATE_EL1
    arch.in_cpu = False
    hw = arch.hw
    hw.write_reg(R.UC_ARM64_REG_CP_REG, (*SCTLR_EL1, SCTLR_EL1_RESET))  # kvm_reset_sys_regs
    for reg in (R.UC_ARM64_REG_VBAR_EL1, R.UC_ARM64_REG_ESR_EL1, R.UC_ARM64_REG_FAR_EL1):
        hw.write_reg(reg, 0)
    arch.mmio_needed = False
    reset_state = arch.reset_state
    if reset_state.reset:
        note("PSCI CPU_ON: pc and x0 from the caller", pc=reset_state.pc, x0=reset_state.r0)
        arch.ctxt.regs.pc = reset_state.pc
        vcpu_set_reg(vcpu, 0, reset_state.r0)
        reset_state.reset = False
