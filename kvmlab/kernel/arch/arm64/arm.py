"""arch/arm64/kvm/arm.c for the simulator: VM and vCPU ioctls, vCPU init, and KVM_RUN.

An arm64 vCPU does nothing until KVM_ARM_VCPU_INIT has chosen its target and features
(KVM_RUN, ONE_REG and KVM_GET_REG_LIST fail with ENOEXEC before). Unknown VM ioctls are
EINVAL on arm64 (x86 says ENOTTY). Functions keep Linux 6.12's names and order:
https://elixir.bootlin.com/linux/v6.12/source/arch/arm64/kvm/arm.c
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

from kvmlab.kernel import eventfd
from kvmlab.kernel.arch.arm64.emulate import (
    KvmArchVm,
    KvmVcpuArch,
    KvmVcpuStat,
    kvm_arm_vcpu_power_off,
    kvm_arm_vcpu_stopped,
    reset_mpidr,
    run_of,
    vcpu_arch,
    vcpu_stat,
)
from kvmlab.kernel.arch.arm64.guest import kvm_arm_get_reg, kvm_arm_reg_indices, kvm_arm_set_reg
from kvmlab.kernel.arch.arm64.handle_exit import handle_exit
from kvmlab.kernel.arch.arm64.hyp import ARM_EXCEPTION_IRQ, VECTOR_IRQ, R, UcVcpu
from kvmlab.kernel.arch.arm64.mmio import kvm_handle_mmio_return
from kvmlab.kernel.arch.arm64.reset import kvm_reset_vcpu
from kvmlab.kernel.kvm_main import Kvm, KvmVcpu, kvm_exit, kvm_init
from kvmlab.kernel.signals import signal_pending
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import (
    KVM_CAP_ARM_PSCI,
    KVM_CAP_ARM_PSCI_0_2,
    KVM_CAP_ARM_VM_IPA_SIZE,
    KVM_CAP_IRQCHIP,
    KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_MP_STATE,
    KVM_CAP_NR_VCPUS,
    KVM_CAP_ONE_REG,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_SYNC_MMU,
    KVM_CREATE_IRQCHIP,
    KVM_EXIT_INTR,
    KVM_EXIT_MMIO,
    KVM_EXIT_UNKNOWN,
    KVM_GET_ONE_REG,
    KVM_GET_REG_LIST,
    KVM_IRQ_LINE,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_STOPPED,
    KVM_SET_MP_STATE,
    KVM_SET_ONE_REG,
    kvm_irq_level,
    kvm_mp_state,
    kvm_one_reg,
    kvm_reg_list,
)
from kvmlab.uapi.arm64 import (
    KVM_ARM_IRQ_CPU_FIQ,
    KVM_ARM_IRQ_CPU_IRQ,
    KVM_ARM_IRQ_TYPE_CPU,
    KVM_ARM_IRQ_TYPE_SHIFT,
    KVM_ARM_IRQ_VCPU2_SHIFT,
    KVM_ARM_IRQ_VCPU_SHIFT,
    KVM_ARM_PREFERRED_TARGET,
    KVM_ARM_TARGET_GENERIC_V8,
    KVM_ARM_VCPU_INIT,
    KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2,
    PSR_I_BIT,
    kvm_run,
    kvm_vcpu_init,
)

KVM_MAX_VCPUS = 512  # VGIC_V3_MAX_CPUS; without a vGIC this is the default limit too
KVM_VCPU_MAX_FEATURES = 8  # features[0] bits 0-7 are defined (POWER_OFF .. HAS_EL2)
KVM_VCPU_VALID_FEATURES = (1 << KVM_VCPU_MAX_FEATURES) - 1
# What this "hardware" supports: no AArch32, PMU, SVE, pointer auth or nested virt.
SYSTEM_SUPPORTED_VCPU_FEATURES = 1 << KVM_ARM_VCPU_POWER_OFF | 1 << KVM_ARM_VCPU_PSCI_0_2
KVM_VM_TYPE_ARM_IPA_SIZE_MASK = 0xFF
KVM_PHYS_SHIFT = 40  # the default IPA size
KVM_IPA_LIMIT = 44  # the PARange of Unicorn's Cortex-A72
ARM64_MIN_PARANGE_BITS = 32
HCR_VI, HCR_VF = 1 << 7, 1 << 6


def kvm_arch_dev_ioctl(cmd: int, arg: int) -> int:
    """/dev/kvm ioctls the generic code does not know: none on arm64."""
    fail(errno.EINVAL)


# --- VM ---------------------------------------------------------------------------------------


@traced(args=lambda kvm, type_: {"type": type_})
def kvm_arch_init_vm(kvm: Kvm, type_: int) -> None:
    """The VM type is the IPA size in bits 7:0 (0 = 40 bits); kvm_init_ipa_range checks it."""
    if type_ & ~KVM_VM_TYPE_ARM_IPA_SIZE_MASK:
        fail(errno.EINVAL)
    phys_shift = type_ & KVM_VM_TYPE_ARM_IPA_SIZE_MASK
    if phys_shift and not ARM64_MIN_PARANGE_BITS <= phys_shift <= KVM_IPA_LIMIT:
        fail(errno.EINVAL)
    kvm.arch = KvmArchVm(ipa_bits=phys_shift or KVM_PHYS_SHIFT)
    kvm.max_vcpus = KVM_MAX_VCPUS  # kvm_arm_default_max_vcpus()


def kvm_arch_destroy_vm(kvm: Kvm) -> None:
    """Nothing VM-wide to free: each vCPU's CPU goes with kvm_arch_vcpu_destroy."""


def kvm_vm_ioctl_check_extension(kvm: Kvm | None, cap: int) -> int:
    """arm64's answers for the capabilities kvmlab implements; 0 for everything else."""
    if cap in (
        KVM_CAP_ONE_REG,
        KVM_CAP_ARM_PSCI,
        KVM_CAP_ARM_PSCI_0_2,
        KVM_CAP_READONLY_MEM,
        KVM_CAP_MP_STATE,
        KVM_CAP_SYNC_MMU,
    ):
        return 1
    if cap == KVM_CAP_IRQCHIP:
        return 0  # no in-kernel vGIC: interrupts go through KVM_IRQ_LINE to the vCPU's pins
    if cap == KVM_CAP_NR_VCPUS:
        return min(os.cpu_count() or 1, KVM_MAX_VCPUS)
    if cap in (KVM_CAP_MAX_VCPUS, KVM_CAP_MAX_VCPU_ID):
        return kvm.max_vcpus if kvm is not None else KVM_MAX_VCPUS
    if cap == KVM_CAP_ARM_VM_IPA_SIZE:
        return KVM_IPA_LIMIT
    return 0


def kvm_arch_intc_initialized(kvm: Kvm) -> bool:
    """vgic_initialized(): never, with no vGIC, so KVM_IRQFD is EAGAIN (kvm_irqfd_assign)."""
    return False


def kvm_set_irq(kvm: Kvm, gsi: int, level: int) -> int:
    """No vGIC, so no GSI routing table: a GSI reaches nothing (-1), as kvm_set_irq says."""
    return -1


@traced(args=lambda kvm, cmd, arg: {"cmd": hex(cmd)})
def kvm_arch_vm_ioctl(kvm: Kvm, cmd: int, arg: int) -> int:
    """KVM_ARM_PREFERRED_TARGET, KVM_IRQ_LINE, KVM_CREATE_IRQCHIP; anything else EINVAL."""
    if cmd == KVM_ARM_PREFERRED_TARGET:
        copy_to_user(arg, kvm_vcpu_init(target=KVM_ARM_TARGET_GENERIC_V8))
        return 0
    if cmd == KVM_IRQ_LINE:
        kvm_vm_ioctl_irq_line(kvm, copy_struct_from_user(kvm_irq_level, arg))
        return 0
    if cmd == KVM_CREATE_IRQCHIP:
        fail(errno.ENXIO)  # no vGIC on this host
    fail(errno.EINVAL)


@traced(args=lambda kvm, irq: {"irq": irq.irq, "level": irq.level})
def kvm_vm_ioctl_irq_line(kvm: Kvm, irq: kvm_irq_level) -> None:
    """Without an in-kernel GIC, userspace drives a vCPU's IRQ and FIQ pins directly."""
    irq_type = (irq.irq >> KVM_ARM_IRQ_TYPE_SHIFT) & 0xF
    vcpu_id = (irq.irq >> KVM_ARM_IRQ_VCPU_SHIFT) & 0xFF
    vcpu_id += ((irq.irq >> KVM_ARM_IRQ_VCPU2_SHIFT) & 0xF) * 256
    irq_num = irq.irq & 0xFFFF
    if irq_type != KVM_ARM_IRQ_TYPE_CPU:
        fail(errno.ENXIO)  # SPIs and PPIs need the in-kernel GIC
    vcpu = kvm.kvm_get_vcpu_by_id(vcpu_id)
    if vcpu is None:
        fail(errno.EINVAL)
    if irq_num > KVM_ARM_IRQ_CPU_FIQ:
        fail(errno.EINVAL)
    bit = HCR_VI if irq_num == KVM_ARM_IRQ_CPU_IRQ else HCR_VF
    arch = vcpu_arch(vcpu)
    with arch.hw.wake:
        arch.irq_lines = arch.irq_lines | bit if irq.level else arch.irq_lines & ~bit
        if arch.irq_lines:
            arch.hw.wake.notify_all()  # kvm_vcpu_kick: a WFI wakes up


# --- vCPU creation and init -------------------------------------------------------------------


@traced(args=lambda kvm, id_: {"id": id_})
def kvm_arch_vcpu_precreate(kvm: Kvm, id_: int) -> None:
    """No vGIC to be initialised already; the id must be below max_vcpus."""
    if id_ >= kvm.max_vcpus:
        fail(errno.EINVAL)


@traced()
def kvm_arch_vcpu_create(vcpu: KvmVcpu) -> None:
    """A vCPU exists but is not initialised: it runs nothing before KVM_ARM_VCPU_INIT."""
    vcpu.arch = KvmVcpuArch(hw=UcVcpu(), mpidr=reset_mpidr(vcpu.vcpu_id))
    vcpu.stat = KvmVcpuStat()  # type: ignore[assignment]  # arm64's counters


@traced()
def kvm_arch_vcpu_destroy(vcpu: KvmVcpu) -> None:
    if vcpu.arch is not None:
        vcpu_arch(vcpu).hw.close()


def kvm_arch_vcpu_ioctl(vcpu: KvmVcpu, cmd: int, arg: int) -> int:
    """The arm64 vCPU ioctls; anything unknown (KVM_GET_REGS too) is EINVAL."""
    arch = vcpu_arch(vcpu)
    if cmd == KVM_ARM_VCPU_INIT:
        kvm_arch_vcpu_ioctl_vcpu_init(vcpu, copy_struct_from_user(kvm_vcpu_init, arg))
        return 0
    if cmd in (KVM_GET_ONE_REG, KVM_SET_ONE_REG):
        if not kvm_vcpu_initialized(vcpu):
            fail(errno.ENOEXEC)
        reg = copy_struct_from_user(kvm_one_reg, arg)
        if arch.req_vcpu_reset:  # a PSCI reset is owed: do it before userspace looks
            arch.req_vcpu_reset = False
            kvm_reset_vcpu(vcpu)
        if cmd == KVM_SET_ONE_REG:
            kvm_arm_set_reg(vcpu, reg)
        else:
            kvm_arm_get_reg(vcpu, reg)
        return 0
    if cmd == KVM_GET_REG_LIST:
        return kvm_vcpu_ioctl_get_reg_list(vcpu, arg)
    if cmd == KVM_SET_MP_STATE:
        kvm_arch_vcpu_ioctl_set_mpstate(vcpu, copy_struct_from_user(kvm_mp_state, arg))
        return 0
    fail(errno.EINVAL)


@traced()
def kvm_vcpu_ioctl_get_reg_list(vcpu: KvmVcpu, arg: int) -> int:
    """Write how many registers there are; E2BIG if the caller's n is smaller, else the ids."""
    if not kvm_vcpu_initialized(vcpu):
        fail(errno.ENOEXEC)
    header = copy_struct_from_user(kvm_reg_list, arg)
    n = header.n & 0xFFFFFFFF  # the kernel keeps it in an unsigned int
    indices = kvm_arm_reg_indices(vcpu)
    copy_to_user(arg, kvm_reg_list(n=len(indices)))
    note("n < number of registers?", n=n, needed=len(indices))
    if n < len(indices):
        fail(errno.E2BIG)
    copy_to_user(
        arg + ctypes.sizeof(kvm_reg_list), b"".join(i.to_bytes(8, "little") for i in indices)
    )
    return 0


def kvm_vcpu_initialized(vcpu: KvmVcpu) -> bool:
    return vcpu_arch(vcpu).initialized


@traced(args=lambda vcpu, init: {"target": init.target, "features": init.features[0]})
def kvm_arch_vcpu_ioctl_vcpu_init(vcpu: KvmVcpu, init: kvm_vcpu_init) -> None:
    """KVM_ARM_VCPU_INIT: POWER_OFF applies to this call only; the rest must match the VM's."""
    arch = vcpu_arch(vcpu)
    power_off = bool(init.features[0] & (1 << KVM_ARM_VCPU_POWER_OFF))
    init.features[0] &= ~(1 << KVM_ARM_VCPU_POWER_OFF)
    kvm_vcpu_set_target(vcpu, init)
    with arch.hw.wake:
        if power_off:
            note("start powered off: a PSCI CPU_ON will start it")
            arch.mp_state = KVM_MP_STATE_STOPPED
            arch.req_sleep = True
        else:
            arch.mp_state = KVM_MP_STATE_RUNNABLE


def kvm_vcpu_set_target(vcpu: KvmVcpu, init: kvm_vcpu_init) -> None:
    """The target must be GENERIC_V8; unknown feature bits are ENOENT, unsupported ones
    EINVAL; a second init (or another vCPU's) must ask for the same features."""
    note("target == KVM_ARM_TARGET_GENERIC_V8?", target=init.target)
    if init.target != KVM_ARM_TARGET_GENERIC_V8:
        fail(errno.EINVAL)
    features = init.features[0]
    if features & ~KVM_VCPU_VALID_FEATURES or any(init.features[1:]):
        fail(errno.ENOENT)
    if features & ~SYSTEM_SUPPORTED_VCPU_FEATURES:
        fail(errno.EINVAL)
    arch = vcpu_arch(vcpu)
    kvm_arch: KvmArchVm = vcpu.kvm.arch
    if kvm_arch.vcpu_features is not None and kvm_arch.vcpu_features != features:
        note("features differ from the VM's", vm=kvm_arch.vcpu_features, features=features)
        fail(errno.EINVAL)
    kvm_arch.vcpu_features = features
    arch.features = features
    arch.initialized = True
    kvm_reset_vcpu(vcpu)


def kvm_arch_vcpu_ioctl_get_mpstate(vcpu: KvmVcpu) -> int:
    return vcpu_arch(vcpu).mp_state


@traced(args=lambda vcpu, mp: {"mp_state": mp.mp_state})
def kvm_arch_vcpu_ioctl_set_mpstate(vcpu: KvmVcpu, mp: kvm_mp_state) -> None:
    arch = vcpu_arch(vcpu)
    if mp.mp_state == KVM_MP_STATE_RUNNABLE:
        with arch.hw.wake:
            arch.mp_state = KVM_MP_STATE_RUNNABLE
            arch.hw.wake.notify_all()
    elif mp.mp_state == KVM_MP_STATE_STOPPED:
        kvm_arm_vcpu_power_off(vcpu)
    else:
        fail(errno.EINVAL)


# --- KVM_RUN ------------------------------------------------------------------------------------


@traced()
def kvm_arch_vcpu_run_pid_change(vcpu: KvmVcpu) -> None:
    """The first KVM_RUN from a thread: the vCPU must be initialised (ENOEXEC), and its
    first run ever sets up what it needs (kvm_vcpu_first_run_init)."""
    if not kvm_vcpu_initialized(vcpu):
        note("kvm_vcpu_initialized: no KVM_ARM_VCPU_INIT yet")
        fail(errno.ENOEXEC)
    arch = vcpu_arch(vcpu)
    if not arch.has_run_once:
        kvm_vcpu_first_run_init(vcpu)


@traced()
def kvm_vcpu_first_run_init(vcpu: KvmVcpu) -> None:
    """Once per vCPU (a function of its own until Linux 5.15, now inside
    kvm_arch_vcpu_run_pid_change): MPIDR data, debug, vGIC, timer and PMU set-up."""
    note("kvm_init_mpidr_data, kvm_arm_vcpu_init_debug")
    note("kvm_vgic_map_resources: no in-kernel vGIC; kvm_timer_enable; kvm_arm_pmu_v3_enable")
    vcpu_arch(vcpu).has_run_once = True
    vcpu.kvm.arch.has_ran_once = True


@traced()
def kvm_arch_vcpu_ioctl_run(vcpu: KvmVcpu) -> int:
    """KVM_RUN: finish the last MMIO access, then enter the guest until userspace is needed."""
    run = run_of(vcpu)
    arch = vcpu_arch(vcpu)
    if run.exit_reason == KVM_EXIT_MMIO:
        kvm_handle_mmio_return(vcpu)
    note("vcpu_load")
    if run.immediate_exit:
        fail(errno.EINTR)
    note("kvm_sigset_activate")
    run.exit_reason = KVM_EXIT_UNKNOWN
    run.flags = 0
    slots = vcpu.kvm.memslots[0]
    if arch.hw.generation != slots.generation:
        arch.hw.load_memslots(slots)
    else:
        arch.hw.invalidate_stale_code()
    ret = 1
    try:
        while ret > 0:
            xfer_to_guest_mode_handle_work(vcpu)
            check_vcpu_requests(vcpu)
            note("kvm_pmu_flush_hwstate, kvm_vgic_flush_hwstate: no in-kernel vGIC or PMU")
            ret = kvm_arm_vcpu_enter_exit(vcpu)
            vcpu_stat(vcpu).exits += 1
            note("kvm_vgic_sync_hwstate, kvm_timer_sync_user", exits=vcpu_stat(vcpu).exits)
            ret = handle_exit(vcpu, ret)
    finally:
        note("kvm_sigset_deactivate, vcpu_put")
    return 0


@traced()
def xfer_to_guest_mode_handle_work(vcpu: KvmVcpu) -> None:
    """A pending signal (or a kick) ends KVM_RUN here: EINTR with KVM_EXIT_INTR."""
    if signal_pending(vcpu):
        vcpu_stat(vcpu).signal_exits += 1
        run_of(vcpu).exit_reason = KVM_EXIT_INTR  # kvm_handle_signal_exit
        fail(errno.EINTR)


@traced()
def check_vcpu_requests(vcpu: KvmVcpu) -> None:
    """KVM_REQ_SLEEP: a stopped vCPU sleeps until CPU_ON (or a signal) wakes it;
    KVM_REQ_VCPU_RESET: apply a PSCI CPU_ON's reset."""
    arch = vcpu_arch(vcpu)
    if arch.req_sleep or kvm_arm_vcpu_stopped(vcpu):
        kvm_vcpu_sleep(vcpu)
    if arch.req_vcpu_reset:
        arch.req_vcpu_reset = False
        kvm_reset_vcpu(vcpu)


@traced()
def kvm_vcpu_sleep(vcpu: KvmVcpu) -> None:
    """Wait while the vCPU is stopped; a kick wakes it to look for signals, then it sleeps
    again if still stopped."""
    arch = vcpu_arch(vcpu)
    hw = arch.hw
    while True:
        with hw.wake:
            while kvm_arm_vcpu_stopped(vcpu) and not hw.kick_requested:
                hw.wake.wait()
            if not kvm_arm_vcpu_stopped(vcpu):
                arch.req_sleep = False
                return
            hw.kick_requested = False
        xfer_to_guest_mode_handle_work(vcpu)


@traced("kvm_arm_vcpu_enter_exit")
def kvm_arm_vcpu_enter_exit(vcpu: KvmVcpu) -> int:
    """kvm_call_hyp_ret(__kvm_vcpu_run, vcpu): load the context, run, take the exit.

    One vCPU of the VM is in the guest at a time (the VM's guest lock, as on x86).
    """
    arch = vcpu_arch(vcpu)
    hw = arch.hw
    if not arch.in_cpu:
        hw.load_ctxt(arch.ctxt)
        arch.in_cpu = True
    if arch.irq_lines & HCR_VI and not hw.read_reg(R.UC_ARM64_REG_PSTATE) & PSR_I_BIT:
        note("IRQ line high, PSTATE.I clear: the guest takes the interrupt")
        hw.take_exception(VECTOR_IRQ, hw.read_reg(R.UC_ARM64_REG_PC))
    guest_lock = vcpu.kvm.guest_lock
    guest_lock.acquire(vcpu)
    try:
        ret = hw.vcpu_run()
    finally:
        guest_lock.release()
    if ret == ARM_EXCEPTION_IRQ:
        time.sleep(0)  # kicked, perhaps for another vCPU's turn: let it take the CPU
    return ret


class Arm64:
    """The arm64 ops handed to kvm_init."""

    name = "arm64"
    KVM_MAX_VCPUS = KVM_MAX_VCPUS
    KVM_MAX_VCPU_IDS = KVM_MAX_VCPUS
    KVM_VCPU_MMAP_PAGES = 2  # kvm_run and the coalesced MMIO ring (no PIO page on arm64)
    kvm_run_type = kvm_run

    kvm_arch_dev_ioctl = staticmethod(kvm_arch_dev_ioctl)
    kvm_arch_init_vm = staticmethod(kvm_arch_init_vm)
    kvm_arch_destroy_vm = staticmethod(kvm_arch_destroy_vm)
    kvm_vm_ioctl_check_extension = staticmethod(kvm_vm_ioctl_check_extension)
    kvm_arch_vm_ioctl = staticmethod(kvm_arch_vm_ioctl)
    kvm_arch_vcpu_precreate = staticmethod(kvm_arch_vcpu_precreate)
    kvm_arch_vcpu_create = staticmethod(kvm_arch_vcpu_create)
    kvm_arch_vcpu_destroy = staticmethod(kvm_arch_vcpu_destroy)
    kvm_arch_vcpu_ioctl = staticmethod(kvm_arch_vcpu_ioctl)
    kvm_arch_vcpu_ioctl_run = staticmethod(kvm_arch_vcpu_ioctl_run)
    kvm_arch_vcpu_ioctl_get_mpstate = staticmethod(kvm_arch_vcpu_ioctl_get_mpstate)
    kvm_arch_vcpu_run_pid_change = staticmethod(kvm_arch_vcpu_run_pid_change)
    kvm_arch_intc_initialized = staticmethod(kvm_arch_intc_initialized)
    kvm_arch_irqfd_allowed = staticmethod(eventfd.kvm_arch_irqfd_allowed)  # the generic one
    kvm_set_irq = staticmethod(kvm_set_irq)


# --- module load and unload -------------------------------------------------------------------


@traced()
def kvm_arm_init() -> None:
    """module_init on arm64 (kvm is built in there; kvmlab loads it like a module)."""
    kvm_init(Arm64())


@traced()
def kvm_arm_exit() -> None:
    kvm_exit()
