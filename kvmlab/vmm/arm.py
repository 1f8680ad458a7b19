"""The arm64 half of the vCPU loop: QEMU's target/arm/kvm.c hooks, cut down.

arm64 KVM has no KVM_GET_REGS: a vCPU is first given its target and features with
KVM_ARM_VCPU_INIT (`kvm_arch_init_vcpu`), and every register is read and written one at a
time by id (KVM_GET_ONE_REG / KVM_SET_ONE_REG). There is no HLT exit either: a `wfi` sleeps
inside KVM_RUN, and PSCI calls (`hvc #0`) that need the VMM arrive as KVM_EXIT_SYSTEM_EVENT,
which the generic loop handles. With no in-kernel GIC and no interrupting devices on the
board, there is nothing to inject before an entry.
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/target/arm/kvm.c
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvmlab.uapi import (
    EXIT_REASON_NAMES,
    KVM_EXIT_DEBUG,
    KVM_GET_ONE_REG,
    KVM_SET_ONE_REG,
    kvm_one_reg,
)
from kvmlab.uapi.arm64 import (
    CORE_REG_NAMES,
    KVM_ARM_PREFERRED_TARGET,
    KVM_ARM_VCPU_INIT,
    KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2,
    KVM_NR_SPSR,
    KVM_REG_ARM_CORE_REG_SPSR,
    KVM_REG_ARM_CORE_REG_X,
    KVM_REG_SIZE,
    REG_ELR_EL1,
    REG_PC,
    REG_PSTATE,
    REG_SP,
    REG_SP_EL1,
    kvm_run,
    kvm_vcpu_init,
)
from kvmlab.vmm.cpu import EXCP_DEBUG, CPUState

CODE_BYTES = 16  # instruction bytes shown from pc in a register dump


@dataclass(eq=False)
class ARMCPU(CPUState):
    """An arm64 vCPU: QEMU's ARMCPU. `core` is its copy of the core registers (QEMU's env),
    by ONE_REG id: `cpu.core[REG_PC]`."""

    target: ClassVar[str] = "arm"
    kvm_run_type: ClassVar[type[Any]] = kvm_run
    kvm_target: int = 0  # from KVM_ARM_PREFERRED_TARGET
    start_powered_off: bool = False  # a secondary: waits for PSCI CPU_ON
    kvm_init_features: int = 0  # features[0] of KVM_ARM_VCPU_INIT
    core: dict[int, int] = field(default_factory=dict)


def arm_cpu(cpu: CPUState) -> ARMCPU:
    if not isinstance(cpu, ARMCPU):
        raise TypeError(f"vCPU {cpu.cpu_index} is not an arm64 CPU")
    return cpu


# --- ONE_REG (QEMU keeps these two in kvm-all.c) ---------------------------------------------


def kvm_get_one_reg(cpu: CPUState, reg_id: int) -> int:
    """KVM_GET_ONE_REG: the value of register `reg_id` (its size is in the id)."""
    buf = (ctypes.c_uint8 * KVM_REG_SIZE(reg_id))()
    cpu.k.ioctl(cpu.kvm_fd, KVM_GET_ONE_REG, kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))
    return int.from_bytes(bytes(buf), "little")


def kvm_set_one_reg(cpu: CPUState, reg_id: int, value: int) -> None:
    """KVM_SET_ONE_REG: write `value` to register `reg_id`."""
    size = KVM_REG_SIZE(reg_id)
    buf = (ctypes.c_uint8 * size).from_buffer_copy(value.to_bytes(size, "little"))
    cpu.k.ioctl(cpu.kvm_fd, KVM_SET_ONE_REG, kvm_one_reg(id=reg_id, addr=ctypes.addressof(buf)))


# --- vCPU set-up --------------------------------------------------------------------------------


def kvm_arm_preferred_target(k: Any, vmfd: int) -> int:
    """KVM_ARM_PREFERRED_TARGET: the CPU target this host's KVM wants (GENERIC_V8 today)."""
    init = kvm_vcpu_init()
    k.ioctl(vmfd, KVM_ARM_PREFERRED_TARGET, init)
    return int(init.target)


def kvm_arch_init_vcpu(cpu: CPUState) -> None:
    """Choose the features (PSCI 0.2; POWER_OFF for a secondary), KVM_ARM_VCPU_INIT, and read
    the reset registers."""
    arm = arm_cpu(cpu)
    arm.kvm_init_features = 1 << KVM_ARM_VCPU_PSCI_0_2
    if arm.start_powered_off:
        arm.kvm_init_features |= 1 << KVM_ARM_VCPU_POWER_OFF
    kvm_arm_vcpu_init(arm)
    kvm_arch_get_registers(arm)


def kvm_arm_vcpu_init(cpu: ARMCPU) -> None:
    """KVM_ARM_VCPU_INIT with the CPU's target and features: registers back to KVM's reset
    state, and the vCPU runnable (or stopped, with POWER_OFF)."""
    init = kvm_vcpu_init(target=cpu.kvm_target)
    init.features[0] = cpu.kvm_init_features
    cpu.k.ioctl(cpu.kvm_fd, KVM_ARM_VCPU_INIT, init)


def kvm_arm_reset_vcpu(cpu: CPUState) -> None:
    """A machine reset: init the vCPU again, as QEMU does, and re-read what KVM reset."""
    arm = arm_cpu(cpu)
    kvm_arm_vcpu_init(arm)
    kvm_arch_get_registers(arm)


# --- registers: QEMU's env <-> KVM ------------------------------------------------------------

# What the VMM keeps, by ONE_REG id: x0-x30, sp, pc, pstate, sp_el1, elr_el1 and the SPSRs
# (QEMU also moves the FP/SIMD registers and the system registers).
CORE_REGS: tuple[int, ...] = (
    *(KVM_REG_ARM_CORE_REG_X(n) for n in range(31)),
    REG_SP,
    REG_PC,
    REG_PSTATE,
    REG_SP_EL1,
    REG_ELR_EL1,
    *(KVM_REG_ARM_CORE_REG_SPSR(n) for n in range(KVM_NR_SPSR)),
)


def kvm_arch_get_registers(cpu: CPUState) -> None:
    """KVM_GET_ONE_REG for each core register into the CPU's copy (`cpu.core`)."""
    arm = arm_cpu(cpu)
    arm.core = {reg_id: kvm_get_one_reg(arm, reg_id) for reg_id in CORE_REGS}


def kvm_arch_put_registers(cpu: CPUState) -> None:
    """KVM_SET_ONE_REG for each core register from the CPU's copy."""
    arm = arm_cpu(cpu)
    for reg_id in CORE_REGS:
        kvm_set_one_reg(arm, reg_id, arm.core[reg_id])


# --- around KVM_RUN ---------------------------------------------------------------------------


def kvm_arch_process_async_events(cpu: CPUState) -> bool:
    """Never halted in the VMM: a `wfi` waits inside KVM_RUN, not in the vCPU thread."""
    return False


def kvm_arch_pre_run(cpu: CPUState) -> None:
    """Nothing to inject: no in-kernel GIC, and no device of this board interrupts."""


def kvm_arch_post_run(cpu: CPUState) -> None:
    """Nothing to read back: QEMU copies the timer's line level (run->s.regs) to a
    userspace GIC here, and this board has none."""


def kvm_arch_handle_exit(cpu: CPUState) -> int:
    """The exits the generic switch leaves to arm: DEBUG; anything else stops the VM."""
    run = cpu.kvm_run
    reason = run.exit_reason
    if reason == KVM_EXIT_DEBUG:
        return EXCP_DEBUG
    name = EXIT_REASON_NAMES.get(reason, "?")
    cpu.last_error = f"KVM: unknown exit reason {reason} ({name})\n" + cpu_dump_state(cpu)
    return -1


# --- reports ----------------------------------------------------------------------------------


def cpu_get_pc(cpu: CPUState) -> int | None:
    """The guest's pc, fresh from KVM (None if KVM_GET_ONE_REG fails)."""
    try:
        return kvm_get_one_reg(cpu, REG_PC)
    except OSError:
        return None


def cpu_dump_state(cpu: CPUState) -> str:
    """Registers (fresh from KVM) and the instruction bytes at pc, like QEMU's
    `info registers` for an AArch64 CPU. The MMU is taken to be off: pc is an address."""
    try:
        values = {CORE_REG_NAMES[reg_id]: kvm_get_one_reg(cpu, reg_id) for reg_id in CORE_REGS}
    except OSError as e:
        return f"(registers unavailable: {e.strerror})"
    lines = [f"PC={values['pc']:016x} SP={values['sp']:016x}"]
    for row in range(0, 31, 4):
        lines.append(
            " ".join(f"X{n:02}={values[f'x{n}']:016x}" for n in range(row, min(row + 4, 31)))
        )
    lines.append(
        f"PSTATE={values['pstate']:08x} SP_EL1={values['sp_el1']:016x} "
        f"ELR_EL1={values['elr_el1']:016x} SPSR_EL1={values['spsr[0]']:08x}"
    )
    code = cpu.board.memory_read(values["pc"], CODE_BYTES)
    lines.append("Code=" + (code.hex(" ") if code else "(not in guest RAM)"))
    return "\n".join(lines)
