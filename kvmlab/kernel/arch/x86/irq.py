"""The in-kernel irqchip of a VM: creation, the default GSI routing, KVM_IRQ_LINE, and what a
vCPU takes from it at entry (arch/x86/kvm/irq.c, irq_comm.c and the irqchip ioctls of x86.c).

KVM_CREATE_IRQCHIP makes the two 8259s and the IOAPIC and routes GSI 0-15 to both the PIC pin
and the IOAPIC pin of that number, GSI 16-23 to the IOAPIC alone. Every vCPU then has its local
APIC in the kernel; kvmlab models its reset state only (ID = vCPU id, software-disabled, LVT0
in ExtINT mode on vCPU 0), so the PIC reaches vCPU 0 through LINT0 and the IOAPIC's fixed
interrupts find no enabled APIC (its NMIs are delivered).
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/irq_comm.c
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from kvmlab.kernel.arch.x86.i8259 import (
    PIC_NUM_PINS,
    KvmPic,
    kvm_get_pic_state,
    kvm_pic_read_irq,
    kvm_pic_set_irq,
    kvm_set_pic_state,
    picdev_read,
    picdev_write,
)
from kvmlab.kernel.arch.x86.ioapic import (
    KvmIoapic,
    kvm_get_ioapic,
    kvm_ioapic_set_irq,
    kvm_set_ioapic,
)
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import (
    KVM_IOAPIC_NUM_PINS,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    MSR_IA32_APICBASE_ENABLE,
    kvm_irq_level,
    kvm_irqchip,
)

APIC_DM_FIXED, APIC_DM_LOWEST, APIC_DM_NMI = 0, 1, 4
APIC_BROADCAST = 0xFF


@dataclass
class RoutingEntry:
    """struct kvm_kernel_irq_routing_entry of type KVM_IRQ_ROUTING_IRQCHIP."""

    irqchip: int
    pin: int


@dataclass
class KvmIrqchip:
    """What KVM_CREATE_IRQCHIP adds to struct kvm_arch: vpic, vioapic, the routing table."""

    vpic: KvmPic
    vioapic: KvmIoapic
    routing: dict[int, list[RoutingEntry]] = field(default_factory=dict)


def irqchip_in_kernel(kvm: Any) -> bool:
    return kvm.arch.irqchip is not None


def pic_in_kernel(kvm: Any) -> bool:
    return kvm.arch.irqchip is not None


def lapic_in_kernel(vcpu: Any) -> bool:
    return bool(vcpu.kvm.arch.irqchip is not None)


def kvm_apic_hw_enabled(vcpu: Any) -> bool:
    return bool(vcpu.arch.apic_base & MSR_IA32_APICBASE_ENABLE)


def kvm_apic_accept_pic_intr(vcpu: Any) -> bool:
    """PIC interrupts reach a vCPU whose APIC is off, or whose LVT0 is unmasked ExtINT: at
    reset only the BSP's (KVM_X86_QUIRK_LINT0_REENABLED)."""
    return not kvm_apic_hw_enabled(vcpu) or vcpu.vcpu_id == 0


def pic_acceptor(kvm: Any) -> Any:
    """The first vCPU that takes PIC interrupts (the one pic_unlock kicks)."""
    for vcpu in list(kvm.vcpu_array):
        if kvm_apic_accept_pic_intr(vcpu):
            return vcpu
    return None


def kvm_vcpu_kick(vcpu: Any) -> None:
    """Wake the vCPU if it is blocked in KVM_RUN (HLT), or make it leave the guest."""
    arch = vcpu.arch
    arch.hw.kick()
    with arch.halt_wait:
        arch.halt_wait.notify_all()


# --- creation and the ioctls -------------------------------------------------------------------


@traced()
def kvm_vm_ioctl_create_irqchip(kvm: Any) -> int:
    """KVM_CREATE_IRQCHIP: EEXIST if there is one, EINVAL once a vCPU exists."""
    with kvm.lock:
        if irqchip_in_kernel(kvm):
            fail(errno.EEXIST)
        if kvm.created_vcpus:
            note("vCPUs exist: their APICs would be missing", created_vcpus=kvm.created_vcpus)
            fail(errno.EINVAL)
        pic = KvmPic(lambda: pic_acceptor(kvm), kvm_vcpu_kick)
        ioapic = KvmIoapic(lambda entry: kvm_irq_delivery_to_apic(kvm, entry))
        chip = KvmIrqchip(pic, ioapic)
        kvm_setup_default_irq_routing(chip)
        kvm.arch.irqchip = chip
    return 0


@traced()
def kvm_setup_default_irq_routing(chip: KvmIrqchip) -> None:
    """GSI n -> IOAPIC pin n (0-23) and, for n < 16, PIC pin n too."""
    for gsi in range(KVM_IOAPIC_NUM_PINS):
        entries = [RoutingEntry(KVM_IRQCHIP_IOAPIC, gsi)]
        if gsi < PIC_NUM_PINS:
            pic = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            entries.append(RoutingEntry(pic, gsi))
        chip.routing[gsi] = entries


@traced(args=lambda kvm, gsi, level: {"gsi": gsi, "level": level})
def kvm_set_irq(kvm: Any, gsi: int, level: int) -> int:
    """Set every chip pin the GSI is routed to; the status sums what they answered
    (-1 if each was masked or had no target, 0 coalesced, >0 delivered)."""
    chip: KvmIrqchip = kvm.arch.irqchip
    ret = -1
    for entry in reversed(chip.routing.get(gsi, [])):
        if entry.irqchip == KVM_IRQCHIP_IOAPIC:
            r = kvm_ioapic_set_irq(chip.vioapic, entry.pin, level)
        else:
            r = kvm_pic_set_irq(chip.vpic, entry.pin, level)
        if r >= 0:
            ret = r + max(ret, 0)
    return ret


def kvm_vm_ioctl_irq_line(kvm: Any, arg: int, with_status: bool) -> int:
    """KVM_IRQ_LINE / KVM_IRQ_LINE_STATUS: set a GSI's level (and report the status)."""
    if not irqchip_in_kernel(kvm):
        fail(errno.ENXIO)
    event = copy_struct_from_user(kvm_irq_level, arg)
    event.status = kvm_set_irq(kvm, event.irq, event.level)
    if with_status:
        copy_to_user(arg, event)
    return 0


@traced(args=lambda kvm, arg: {})
def kvm_vm_ioctl_get_irqchip(kvm: Any, arg: int) -> int:
    """KVM_GET_IRQCHIP: the registers of chip 0 (master PIC), 1 (slave) or 2 (IOAPIC)."""
    chip = copy_struct_from_user(kvm_irqchip, arg)
    if not irqchip_in_kernel(kvm):
        fail(errno.ENXIO)
    state: KvmIrqchip = kvm.arch.irqchip
    if chip.chip_id in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
        chip.chip.pic = kvm_get_pic_state(state.vpic, chip.chip_id)
    elif chip.chip_id == KVM_IRQCHIP_IOAPIC:
        chip.chip.ioapic = kvm_get_ioapic(state.vioapic)
    else:
        fail(errno.EINVAL)
    copy_to_user(arg, chip)
    return 0


@traced(args=lambda kvm, arg: {})
def kvm_vm_ioctl_set_irqchip(kvm: Any, arg: int) -> int:
    """KVM_SET_IRQCHIP: load one chip's registers."""
    chip = copy_struct_from_user(kvm_irqchip, arg)
    if not irqchip_in_kernel(kvm):
        fail(errno.ENXIO)
    state: KvmIrqchip = kvm.arch.irqchip
    if chip.chip_id in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
        kvm_set_pic_state(state.vpic, chip.chip_id, chip.chip.pic)
    elif chip.chip_id == KVM_IRQCHIP_IOAPIC:
        kvm_set_ioapic(state.vioapic, chip.chip.ioapic)
    else:
        fail(errno.EINVAL)
    return 0


# --- delivery to the local APICs -------------------------------------------------------------


@traced(args=lambda kvm, entry: {"entry": hex(entry)})
def kvm_irq_delivery_to_apic(kvm: Any, entry: int) -> int:
    """An IOAPIC redirection entry to the APICs it names: -1 if none matched, else the sum of
    what each accepted. At reset every APIC is software-disabled: fixed and lowest-priority
    interrupts are not accepted (0); an NMI is."""
    vector, mode = entry & 0xFF, (entry >> 8) & 7
    logical, dest = bool(entry & (1 << 11)), entry >> 56
    vcpus = [v for v in list(kvm.vcpu_array) if kvm_apic_hw_enabled(v)]
    if not vcpus:
        return -1
    if dest == APIC_BROADCAST or logical:  # the slow path: every APIC is asked
        targets = [v for v in vcpus if dest == APIC_BROADCAST]  # flat logical ids are 0
        ret = -1 if not targets or mode == APIC_DM_LOWEST else 0
    else:  # the APIC map: a physical id finds at most one APIC
        targets = [v for v in vcpus if v.vcpu_id == dest]
        ret = 0
    for vcpu in targets if ret >= 0 else []:
        ret += kvm_apic_set_irq(vcpu, vector, mode)
    return ret


@traced(args=lambda vcpu, vector, mode: {"vcpu": vcpu.vcpu_id, "vector": vector, "mode": mode})
def kvm_apic_set_irq(vcpu: Any, vector: int, mode: int) -> int:
    """__apic_accept_irq on an APIC in its reset state: only an NMI gets through."""
    if mode == APIC_DM_NMI:
        arch = vcpu.arch
        arch.nmi_pending = min(arch.nmi_pending + 1, 1 if arch.nmi_masked else 2)
        kvm_vcpu_kick(vcpu)
        return 1
    note("APIC software-disabled: not accepted", vector=vector, mode=mode)
    return 0


# --- what a vCPU takes at entry ---------------------------------------------------------------


def kvm_cpu_has_extint(vcpu: Any) -> bool:
    """The PIC's output, if this vCPU takes PIC interrupts."""
    chip = vcpu.kvm.arch.irqchip
    return chip is not None and kvm_apic_accept_pic_intr(vcpu) and chip.vpic.output


def kvm_cpu_has_interrupt(vcpu: Any) -> bool:
    """An interrupt waits for this vCPU (the PIC's, the only source a reset APIC passes)."""
    return kvm_cpu_has_extint(vcpu)


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_cpu_get_interrupt(vcpu: Any) -> int:
    """The vector to inject: the PIC's INTA cycle."""
    return kvm_pic_read_irq(vcpu.kvm.arch.irqchip.vpic)


# --- the guest's port accesses the kernel answers --------------------------------------------

PIC_DEVICES = ((0x20, 2), (0xA0, 2), (0x4D0, 2))  # master, slave, ELCR: (base, length)


def kernel_pio(vcpu: Any, port: int, size: int, is_in: bool, value: int) -> int | None:
    """kvm_io_bus for an IN/OUT: the PIC's ports are answered here, with no exit.

    Returns None if no in-kernel device claims the port, else the value read (0 for OUT).
    An access wider than a byte is claimed and does nothing (reads 0), as in KVM.
    """
    chip = vcpu.kvm.arch.irqchip
    if chip is None:
        return None
    for base, length in PIC_DEVICES:
        if base <= port and port + size <= base + length:
            break
    else:
        return None
    if size != 1:
        note("PIC: not a byte access", port=port, size=size)
        return 0
    if is_in:
        return picdev_read(chip.vpic, port)
    picdev_write(chip.vpic, port, value)
    return 0
