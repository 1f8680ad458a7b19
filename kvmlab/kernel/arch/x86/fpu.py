"""KVM_GET_FPU / KVM_SET_FPU: the x87 and SSE state in the FXSAVE layout of struct kvm_fpu.

kvm_fpu's fpr[i] is ST(i), relative to the stack top (FSW bits 13:11); Unicorn names the
physical registers (FP0-FP7), so the two are rotated by TOP. ftwx is FXSAVE's abridged tag
word: one bit per physical register, set when it holds a value.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/x86.c (kvm_arch_vcpu_ioctl_get_fpu)
"""

from __future__ import annotations

from unicorn import Uc
from unicorn.x86_const import (
    UC_X86_REG_FIP,
    UC_X86_REG_FOP,
    UC_X86_REG_FP0,
    UC_X86_REG_FPCW,
    UC_X86_REG_FPSW,
    UC_X86_REG_FPTAG,
    UC_X86_REG_MXCSR,
    UC_X86_REG_XMM0,
)

from kvmlab.kernel.arch.x86.cpu_state import X86CpuState
from kvmlab.kernel.trace import traced
from kvmlab.uapi import kvm_fpu

FCW_RESET = 0x37F
MXCSR_RESET = 0x1F80


def _top(fsw: int) -> int:
    return (fsw >> 11) & 7


@traced()
def kvm_arch_vcpu_ioctl_get_fpu(uc: Uc, fpu: kvm_fpu) -> None:
    fsw = uc.reg_read(UC_X86_REG_FPSW)
    top = _top(fsw)
    for i in range(8):
        mantissa, exponent = uc.reg_read(UC_X86_REG_FP0 + (top + i) % 8)
        raw = mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little")
        fpu.fpr[i][:] = list(raw + bytes(6))
    fpu.fcw = uc.reg_read(UC_X86_REG_FPCW)
    fpu.fsw = fsw
    tags = uc.reg_read(UC_X86_REG_FPTAG)
    fpu.ftwx = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != 3)
    fpu.last_opcode = uc.reg_read(UC_X86_REG_FOP)
    fpu.last_ip = uc.reg_read(UC_X86_REG_FIP)
    for i in range(16):
        fpu.xmm[i][:] = list(uc.reg_read(UC_X86_REG_XMM0 + i).to_bytes(16, "little"))
    fpu.mxcsr = uc.reg_read(UC_X86_REG_MXCSR)


@traced()
def kvm_arch_vcpu_ioctl_set_fpu(uc: Uc, fpu: kvm_fpu) -> None:
    load_fpu(uc, fpu)


def load_fpu(uc: Uc, fpu: kvm_fpu) -> None:
    """Load a kvm_fpu into the CPU."""
    uc.reg_write(UC_X86_REG_FPSW, fpu.fsw)
    top = _top(fpu.fsw)
    for i in range(8):
        raw = bytes(fpu.fpr[i])
        value = (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:10], "little"))
        uc.reg_write(UC_X86_REG_FP0 + (top + i) % 8, value)
    uc.reg_write(UC_X86_REG_FPCW, fpu.fcw)
    tags = sum((0 if fpu.ftwx >> i & 1 else 3) << (2 * i) for i in range(8))
    uc.reg_write(UC_X86_REG_FPTAG, tags)
    uc.reg_write(UC_X86_REG_FOP, fpu.last_opcode)
    uc.reg_write(UC_X86_REG_FIP, fpu.last_ip)
    for i in range(16):
        uc.reg_write(UC_X86_REG_XMM0 + i, int.from_bytes(bytes(fpu.xmm[i]), "little"))
    uc.reg_write(UC_X86_REG_MXCSR, fpu.mxcsr)


def fpu_reset(cpu: X86CpuState) -> None:
    """The power-on x87/SSE state on a new CPU (whose registers are all zero): FCW 0x37f,
    every register empty, MXCSR 0x1f80."""
    cpu.write_reg(UC_X86_REG_FPCW, FCW_RESET)
    cpu.write_reg(UC_X86_REG_FPTAG, 0xFFFF)
    cpu.write_reg(UC_X86_REG_MXCSR, MXCSR_RESET)
