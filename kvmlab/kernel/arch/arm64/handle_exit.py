"""arch/arm64/kvm/handle_exit.c: what KVM does with each trap, by its exception class.

A handler returns 1 to re-enter the guest, 0 to exit to userspace (kvm_run filled in), or
fails with an errno that KVM_RUN returns.
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/handle_exit.c
"""

from __future__ import annotations

import errno

from kvmlab.kernel.arch.arm64.emulate import (
    kvm_incr_pc,
    run_of,
    vcpu_arch,
    vcpu_set_reg,
    vcpu_stat,
)
from kvmlab.kernel.arch.arm64.hyp import (
    ARM_EXCEPTION_IRQ,
    ARM_EXCEPTION_NAMES,
    ARM_EXCEPTION_TRAP,
    EC_NAMES,
    ESR_ELx_EC_DABT_LOW,
    ESR_ELx_EC_HVC64,
    ESR_ELx_EC_IABT_LOW,
    ESR_ELx_EC_SMC64,
    ESR_ELx_EC_WFx,
    esr_ec,
)
from kvmlab.kernel.arch.arm64.mmio import io_mem_abort
from kvmlab.kernel.arch.arm64.psci import kvm_smccc_call_handler
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import fail
from kvmlab.uapi import KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_DELIVERY_EV


@traced(
    args=lambda vcpu, exception_index: {
        "exception": ARM_EXCEPTION_NAMES.get(exception_index, exception_index),
        "ec": EC_NAMES.get(esr_ec(vcpu.arch.hw.esr), hex(esr_ec(vcpu.arch.hw.esr)))
        if exception_index == ARM_EXCEPTION_TRAP
        else None,
    }
)
def handle_exit(vcpu: KvmVcpu, exception_index: int) -> int:
    """An interrupt (here: a kick) just re-enters; a trap goes to arm_exit_handlers[EC]."""
    if exception_index == ARM_EXCEPTION_IRQ:
        return 1
    ec = esr_ec(vcpu_arch(vcpu).hw.esr)
    if ec == ESR_ELx_EC_HVC64:
        return handle_hvc(vcpu)
    if ec == ESR_ELx_EC_SMC64:
        return handle_smc(vcpu)
    if ec == ESR_ELx_EC_WFx:
        return kvm_handle_wfx(vcpu)
    if ec in (ESR_ELx_EC_DABT_LOW, ESR_ELx_EC_IABT_LOW):
        return kvm_handle_guest_abort(vcpu)
    return handle_unsupported(vcpu)


@traced()
def handle_hvc(vcpu: KvmVcpu) -> int:
    """A hypercall: pc is already past the hvc; PSCI and SMCCC answer it."""
    vcpu_stat(vcpu).hvc_exit_stat += 1
    return kvm_smccc_call_handler(vcpu)


@traced()
def handle_smc(vcpu: KvmVcpu) -> int:
    """An SMC traps with pc on it: step over it first; a non-zero immediate is refused."""
    kvm_incr_pc(vcpu)
    if vcpu_arch(vcpu).hw.esr & 0xFFFF:
        vcpu_set_reg(vcpu, 0, 2**64 - 1)
        return 1
    return kvm_smccc_call_handler(vcpu)


@traced()
def kvm_handle_wfx(vcpu: KvmVcpu) -> int:
    """WFI: block until an interrupt is pending (or a signal or kick comes), then go on.

    There is no KVM_EXIT_HLT on arm64: the vCPU thread sleeps inside KVM_RUN.
    """
    arch = vcpu_arch(vcpu)
    vcpu_stat(vcpu).wfi_exit_stat += 1
    kvm_vcpu_wfi(vcpu)
    kvm_incr_pc(vcpu)
    note("pc past the wfi", stopped=arch.mp_state)
    return 1


@traced()
def kvm_vcpu_wfi(vcpu: KvmVcpu) -> None:
    """kvm_vcpu_halt -> kvm_vcpu_block: sleep until kvm_arch_vcpu_runnable or a wake-up."""
    hw = vcpu_arch(vcpu).hw
    with hw.wake:
        while not vcpu_arch(vcpu).irq_lines and not hw.kick_requested:
            hw.wake.wait()
        hw.kick_requested = False  # the wake-up is consumed; the loop looks for signals
    vcpu_stat(vcpu).halt_wakeup += 1


@traced()
def kvm_handle_guest_abort(vcpu: KvmVcpu) -> int:
    """Stage-2 fault: in a slot whose host memory is gone, EFAULT; an instruction fetch
    outside every slot, ENOEXEC; a data access outside (or a store to a READONLY slot),
    MMIO."""
    arch = vcpu_arch(vcpu)
    ipa = arch.hw.fault.ipa
    slot = vcpu.kvm.memslots[0].gfn_to_memslot(ipa >> 12)
    is_iabt = esr_ec(arch.hw.esr) == ESR_ELx_EC_IABT_LOW
    if slot is not None and not (slot.readonly and arch.hw.fault.is_write):
        note("the slot's host memory is not mapped", slot=slot.id)
        fail(errno.EFAULT)
    if is_iabt:
        note("prefetch abort on an I/O address")
        fail(errno.ENOEXEC)
    return io_mem_abort(vcpu, ipa)


def handle_unsupported(vcpu: KvmVcpu) -> int:
    """An event kvmlab's CPU cannot deliver (`hw.unsupported` names it): say so, not guess.

    Reported as KVM_EXIT_INTERNAL_ERROR with suberror DELIVERY_EV, as the x86 side does.
    """
    run = run_of(vcpu)
    note("not modelled", what=vcpu_arch(vcpu).hw.unsupported)
    run.exit_reason = KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = KVM_INTERNAL_ERROR_DELIVERY_EV
    run.internal.ndata = 0
    return 0
