"""arch/arm64/kvm/mmio.c: a data abort outside the memory slots becomes KVM_EXIT_MMIO.

A store an ioeventfd takes (kvm_io_bus_write) signals its eventfd and does not exit. Otherwise
KVM emulates nothing here: the syndrome hardware gives (ESR_EL2.ISS) already says the access
size, the register, whether it is a store and how to extend a load. An instruction without a
valid syndrome (ldp, writeback, SIMD) cannot be emulated: KVM_RUN fails with ENOSYS. The pc
stays on the instruction until the next KVM_RUN, which loads a read's data into the register
and steps over it (kvm_handle_mmio_return).
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/mmio.c
"""

from __future__ import annotations

import errno

from kvmlab.kernel import eventfd
from kvmlab.kernel.arch.arm64.emulate import (
    kvm_incr_pc,
    run_of,
    vcpu_arch,
    vcpu_get_reg,
    vcpu_set_reg,
    vcpu_stat,
)
from kvmlab.kernel.arch.arm64.hyp import (
    ESR_ELx_ISV,
    ESR_ELx_SAS_SHIFT,
    ESR_ELx_SF,
    ESR_ELx_SRT_SHIFT,
    ESR_ELx_SSE,
    ESR_ELx_WNR,
)
from kvmlab.kernel.kvm_main import KvmVcpu
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import fail
from kvmlab.uapi import KVM_EXIT_MMIO


@traced(args=lambda vcpu, fault_ipa: {"ipa": fault_ipa})
def io_mem_abort(vcpu: KvmVcpu, fault_ipa: int) -> int:
    arch = vcpu_arch(vcpu)
    esr = arch.hw.esr
    if not esr & ESR_ELx_ISV:
        note("no valid syndrome (ISV = 0): KVM cannot emulate this instruction")
        fail(errno.ENOSYS)
    is_write = bool(esr & ESR_ELx_WNR)
    length = 1 << ((esr >> ESR_ELx_SAS_SHIFT) & 3)
    rt = (esr >> ESR_ELx_SRT_SHIFT) & 0x1F
    run = run_of(vcpu)
    data = vcpu_get_reg(vcpu, rt) & ((1 << (8 * length)) - 1) if is_write else 0
    handled = is_write and eventfd.kvm_io_bus_write(
        vcpu.kvm, eventfd.KVM_MMIO_BUS, fault_ipa, data.to_bytes(length, "little")
    )
    run.mmio.is_write = is_write
    run.mmio.phys_addr = fault_ipa
    run.mmio.len = length
    arch.mmio_needed = True
    if handled:  # an ioeventfd took the store: step over it, back into the guest
        vcpu_stat(vcpu).mmio_exit_kernel += 1
        return kvm_handle_mmio_return(vcpu)
    if is_write:
        for i in range(length):
            run.mmio.data[i] = (data >> (8 * i)) & 0xFF
    vcpu_stat(vcpu).mmio_exit_user += 1
    run.exit_reason = KVM_EXIT_MMIO
    return 0


@traced()
def kvm_handle_mmio_return(vcpu: KvmVcpu) -> int:
    """Finish the access on re-entry: a load takes run->mmio.data (sign-extended if the
    instruction says so, 32-bit for a W register); either way pc moves past it."""
    arch = vcpu_arch(vcpu)
    if not arch.mmio_needed:
        return 1  # already handled
    arch.mmio_needed = False
    esr = arch.hw.esr
    if not esr & ESR_ELx_WNR:
        run = run_of(vcpu)
        length = 1 << ((esr >> ESR_ELx_SAS_SHIFT) & 3)
        data = int.from_bytes(bytes(run.mmio.data[:length]), "little")
        if esr & ESR_ELx_SSE and length < 8:
            mask = 1 << (length * 8 - 1)
            data = ((data ^ mask) - mask) & (2**64 - 1)
        if not esr & ESR_ELx_SF:
            data &= 0xFFFFFFFF
        vcpu_set_reg(vcpu, (esr >> ESR_ELx_SRT_SHIFT) & 0x1F, data)
    kvm_incr_pc(vcpu)
    return 1
