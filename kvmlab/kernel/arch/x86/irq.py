"""The in-kernel irqchip of a VM: creation, GSI routing, KVM_IRQ_LINE, MSIs, and what a
vCPU takes from it at entry (arch/x86/kvm/irq.c, irq_comm.c, virt/kvm/irqchip.c).

KVM_CREATE_IRQCHIP makes the two 8259s and the IOAPIC, a local APIC per vCPU (lapic.py), and
routes GSI 0-15 to both the PIC pin and the IOAPIC pin of that number, GSI 16-23 to the IOAPIC
alone; KVM_SET_GSI_ROUTING replaces that table (chip pins and MSIs). The PIC reaches a vCPU
through its APIC's LINT0 in ExtINT mode (the BSP's at reset); the IOAPIC and MSIs send their
interrupts to the APICs they name.
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/irq_comm.c
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmlab.kernel import eventfd
from kvmlab.kernel.arch.x86 import i8254 as x86_i8254
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
from kvmlab.kernel.arch.x86.lapic import (
    APIC_DM_EXTINT,
    APIC_LVT0,
    APIC_LVT_MASKED,
    APIC_MODE_MASK,
    KvmLapicIrq,
    kvm_apic_has_interrupt,
    kvm_get_apic_interrupt,
    kvm_irq_delivery_to_apic,
    kvm_vcpu_kick,
    vcpu_apic,
)
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import copy_from_user, copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import (
    KVM_IOAPIC_NUM_PINS,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_IRQ_ROUTES,
    MSR_IA32_APICBASE_ENABLE,
    kvm_irq_level,
    kvm_irq_routing,
    kvm_irq_routing_entry,
    kvm_irqchip,
    kvm_msi,
)

KVM_MSI_VALID_DEVID = 1 << 0


@dataclass
class RoutingEntry:
    """struct kvm_kernel_irq_routing_entry: a chip pin (KVM_IRQ_ROUTING_IRQCHIP; PIC pins are
    0-15 across both chips) or an MSI's address and data (KVM_IRQ_ROUTING_MSI)."""

    type: int
    irqchip: int = 0
    pin: int = 0
    address: int = 0
    data: int = 0


@dataclass
class IrqNotifier:
    """struct kvm_irq_ack_notifier / kvm_irq_mask_notifier: `func` hears of a GSI's EOIs
    (no argument) or mask changes (the new mask)."""

    gsi: int
    func: Callable[..., None]


@dataclass
class KvmIrqchip:
    """What KVM_CREATE_IRQCHIP adds to struct kvm_arch: vpic, vioapic, the routing table, and
    the notifiers the in-kernel PIT registers for GSI 0."""

    vpic: KvmPic
    vioapic: KvmIoapic
    routing: dict[int, list[RoutingEntry]] = field(default_factory=dict)
    ack_notifiers: list[IrqNotifier] = field(default_factory=list)
    mask_notifiers: list[IrqNotifier] = field(default_factory=list)


def irqchip_in_kernel(kvm: Any) -> bool:
    return kvm.arch.irqchip is not None


def pic_in_kernel(kvm: Any) -> bool:
    return kvm.arch.irqchip is not None


def lapic_in_kernel(vcpu: Any) -> bool:
    return vcpu_apic(vcpu) is not None


def kvm_apic_accept_pic_intr(vcpu: Any) -> bool:
    """PIC interrupts reach a vCPU whose APIC is off, or whose LVT0 is unmasked ExtINT."""
    apic = vcpu_apic(vcpu)
    if apic is None or not vcpu.arch.apic_base & MSR_IA32_APICBASE_ENABLE:
        return True
    lvt0 = apic.get(APIC_LVT0)
    return not lvt0 & APIC_LVT_MASKED and lvt0 & APIC_MODE_MASK == APIC_DM_EXTINT


def pic_acceptor(kvm: Any) -> Any:
    """The first vCPU that takes PIC interrupts (the one pic_unlock kicks)."""
    for vcpu in list(kvm.vcpu_array):
        if kvm_apic_accept_pic_intr(vcpu):
            return vcpu
    return None


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
        pic = KvmPic(
            lambda: pic_acceptor(kvm),
            kvm_vcpu_kick,
            lambda pin: kvm_notify_acked_irq(kvm, pic_chip(pin), pin),
            lambda pin, masked: kvm_fire_mask_notifiers(kvm, pic_chip(pin), pin, masked),
        )
        ioapic = KvmIoapic(
            lambda entry: ioapic_deliver(kvm, entry),
            lambda pin: kvm_notify_acked_irq(kvm, KVM_IRQCHIP_IOAPIC, pin),
            lambda pin, masked: kvm_fire_mask_notifiers(kvm, KVM_IRQCHIP_IOAPIC, pin, masked),
        )
        chip = KvmIrqchip(pic, ioapic)
        kvm_setup_default_irq_routing(chip)
        kvm.arch.irqchip = chip
    return 0


def pic_chip(pin: int) -> int:
    """SELECT_PIC: the chip of a PIC pin numbered 0-15 across the pair."""
    return KVM_IRQCHIP_PIC_MASTER if pin < 8 else KVM_IRQCHIP_PIC_SLAVE


def kvm_irq_map_chip_pin(kvm: Any, irqchip: int, pin: int) -> int | None:
    """The GSI routed to a chip's pin, if any."""
    for gsi, entries in list(kvm.arch.irqchip.routing.items()):
        for e in entries:
            if e.type == KVM_IRQ_ROUTING_IRQCHIP and (e.irqchip, e.pin) == (irqchip, pin):
                return gsi
    return None


@traced(args=lambda kvm, irqchip, pin: {"irqchip": irqchip, "pin": pin})
def kvm_notify_acked_irq(kvm: Any, irqchip: int, pin: int) -> None:
    """A chip's pin was acknowledged (the guest's EOI): tell the GSI's ack notifiers."""
    gsi = kvm_irq_map_chip_pin(kvm, irqchip, pin)
    for n in list(kvm.arch.irqchip.ack_notifiers):
        if n.gsi == gsi:
            n.func()


def kvm_register_irq_ack_notifier(kvm: Any, gsi: int, func: Callable[[], None]) -> IrqNotifier:
    """A new ack notifier on `gsi` (an irqfd resampler, the PIT)."""
    notifier = IrqNotifier(gsi, func)
    kvm.arch.irqchip.ack_notifiers.append(notifier)
    return notifier


def kvm_unregister_irq_ack_notifier(kvm: Any, notifier: IrqNotifier) -> None:
    kvm.arch.irqchip.ack_notifiers.remove(notifier)


def kvm_register_irq_mask_notifier(kvm: Any, gsi: int, func: Callable[[bool], None]) -> IrqNotifier:
    """A new mask notifier on `gsi` (the PIT)."""
    notifier = IrqNotifier(gsi, func)
    kvm.arch.irqchip.mask_notifiers.append(notifier)
    return notifier


def kvm_unregister_irq_mask_notifier(kvm: Any, notifier: IrqNotifier) -> None:
    kvm.arch.irqchip.mask_notifiers.remove(notifier)


def kvm_fire_mask_notifiers(kvm: Any, irqchip: int, pin: int, masked: bool) -> None:
    """A chip's pin was masked or unmasked: tell the GSI's mask notifiers."""
    gsi = kvm_irq_map_chip_pin(kvm, irqchip, pin)
    for n in list(kvm.arch.irqchip.mask_notifiers):
        if n.gsi == gsi:
            n.func(masked)


@traced()
def kvm_setup_default_irq_routing(chip: KvmIrqchip) -> None:
    """GSI n -> IOAPIC pin n (0-23) and, for n < 16, PIC pin n too."""
    for gsi in range(KVM_IOAPIC_NUM_PINS):
        entries = [RoutingEntry(KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQCHIP_IOAPIC, gsi)]
        if gsi < PIC_NUM_PINS:
            pic = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            entries.append(RoutingEntry(KVM_IRQ_ROUTING_IRQCHIP, pic, gsi))
        chip.routing[gsi] = entries


@traced(args=lambda kvm, gsi, level: {"gsi": gsi, "level": level})
def kvm_set_irq(kvm: Any, gsi: int, level: int) -> int:
    """Set every chip pin the GSI is routed to; the status sums what they answered
    (-1 if each was masked or had no target, 0 coalesced, >0 delivered)."""
    chip: KvmIrqchip = kvm.arch.irqchip
    ret = -1
    for entry in reversed(chip.routing.get(gsi, [])):
        if entry.type == KVM_IRQ_ROUTING_MSI:
            r = kvm_set_msi(kvm, entry, level)
        elif entry.irqchip == KVM_IRQCHIP_IOAPIC:
            r = kvm_ioapic_set_irq(chip.vioapic, entry.pin, level)
        else:
            r = kvm_pic_set_irq(chip.vpic, entry.pin, level)
        if r >= 0:
            ret = r + max(ret, 0)
    return ret


@traced(args=lambda kvm, entry, level: {"address": hex(entry.address), "data": hex(entry.data)})
def kvm_set_msi(kvm: Any, entry: RoutingEntry, level: int) -> int:
    """A message-signalled interrupt: the address names the APIC(s), the data the vector and
    delivery mode; only a rising level sends it."""
    if not level:
        return -1
    lo, data = entry.address & 0xFFFF_FFFF, entry.data
    irq = KvmLapicIrq(
        vector=data & 0xFF,
        delivery_mode=data & 0x700,
        dest_mode_logical=bool(lo & (1 << 2)),
        trig_mode=bool(data & (1 << 15)),
        dest_id=(lo >> 12) & 0xFF,
    )
    return kvm_irq_delivery_to_apic(kvm, None, irq)


def kvm_vm_ioctl_set_gsi_routing(kvm: Any, arg: int) -> int:
    """KVM_SET_GSI_ROUTING: a whole new table, checked entry by entry before it replaces the
    old one (EINVAL for a bad entry, a chip pin taken twice by one GSI, an MSI sharing a GSI)."""
    header = copy_struct_from_user(kvm_irq_routing, arg)
    if not irqchip_in_kernel(kvm) or header.nr > KVM_MAX_IRQ_ROUTES or header.flags:
        fail(errno.EINVAL)
    size = ctypes.sizeof(kvm_irq_routing_entry)
    raw = copy_from_user(arg + kvm_irq_routing.entries.offset, header.nr * size)
    entries = [kvm_irq_routing_entry.from_buffer_copy(raw, i * size) for i in range(header.nr)]
    kvm_set_irq_routing(kvm, entries)
    return 0


@traced(args=lambda kvm, entries: {"nr": len(entries)})
def kvm_set_irq_routing(kvm: Any, entries: list[kvm_irq_routing_entry]) -> None:
    """Build the new table (setup_routing_entry, kvm_set_routing_entry) and swap it in."""
    if any(e.gsi >= KVM_MAX_IRQ_ROUTES for e in entries):
        fail(errno.EINVAL)
    table: dict[int, list[RoutingEntry]] = {}
    for ue in entries:
        valid_flags = KVM_MSI_VALID_DEVID if ue.type == KVM_IRQ_ROUTING_MSI else 0
        if ue.flags & ~valid_flags:
            fail(errno.EINVAL)
        new = kvm_set_routing_entry(ue)
        for old in table.get(ue.gsi, []):
            chips = old.type == new.type == KVM_IRQ_ROUTING_IRQCHIP
            if not chips or old.irqchip == new.irqchip:
                fail(errno.EINVAL)
        table.setdefault(ue.gsi, []).insert(0, new)
    kvm.arch.irqchip.routing = table


def kvm_set_routing_entry(ue: kvm_irq_routing_entry) -> RoutingEntry:
    """One userspace route, checked: a pin the chip has, or an MSI."""
    if ue.type == KVM_IRQ_ROUTING_IRQCHIP:
        chip, pin = ue.u.irqchip.irqchip, ue.u.irqchip.pin
        if chip in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE):
            if pin >= PIC_NUM_PINS // 2:
                fail(errno.EINVAL)
            pin += 8 if chip == KVM_IRQCHIP_PIC_SLAVE else 0
        elif chip != KVM_IRQCHIP_IOAPIC or pin >= KVM_IOAPIC_NUM_PINS:
            fail(errno.EINVAL)
        return RoutingEntry(KVM_IRQ_ROUTING_IRQCHIP, chip, pin)
    if ue.type == KVM_IRQ_ROUTING_MSI:
        msi = ue.u.msi
        return RoutingEntry(
            KVM_IRQ_ROUTING_MSI, address=msi.address_hi << 32 | msi.address_lo, data=msi.data
        )
    fail(errno.EINVAL)


@traced(args=lambda kvm, arg: {})
def kvm_send_userspace_msi(kvm: Any, arg: int) -> int:
    """KVM_SIGNAL_MSI: deliver one MSI now; the ioctl returns how many APICs took it (0 if
    none did; -1, which userspace sees as EPERM, if nobody was addressed)."""
    msi = copy_struct_from_user(kvm_msi, arg)
    if not irqchip_in_kernel(kvm) or msi.flags & ~KVM_MSI_VALID_DEVID:
        fail(errno.EINVAL)
    entry = RoutingEntry(
        KVM_IRQ_ROUTING_MSI, address=msi.address_hi << 32 | msi.address_lo, data=msi.data
    )
    r = kvm_set_msi(kvm, entry, 1)
    if r < 0:
        fail(-r)
    return r


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


def ioapic_deliver(kvm: Any, entry: int) -> int:
    """ioapic_service's message: a redirection entry as an interrupt for the APICs."""
    irq = KvmLapicIrq(
        vector=entry & 0xFF,
        delivery_mode=entry & 0x700,
        dest_mode_logical=bool(entry & (1 << 11)),
        trig_mode=bool(entry & (1 << 15)),
        dest_id=entry >> 56,
    )
    return kvm_irq_delivery_to_apic(kvm, None, irq)


# --- what a vCPU takes at entry ---------------------------------------------------------------


def kvm_cpu_has_extint(vcpu: Any) -> bool:
    """The PIC's output, if this vCPU takes PIC interrupts."""
    chip = vcpu.kvm.arch.irqchip
    return chip is not None and kvm_apic_accept_pic_intr(vcpu) and chip.vpic.output


def kvm_cpu_has_interrupt(vcpu: Any) -> bool:
    """An interrupt waits for this vCPU: the PIC's, or one its APIC would deliver now."""
    return kvm_cpu_has_extint(vcpu) or kvm_apic_has_interrupt(vcpu) != -1


@traced(args=lambda vcpu: {"vcpu": vcpu.vcpu_id})
def kvm_cpu_get_interrupt(vcpu: Any) -> int:
    """The vector to inject: the PIC's INTA cycle, else the APIC's highest (now in service)."""
    if kvm_cpu_has_extint(vcpu):
        return kvm_pic_read_irq(vcpu.kvm.arch.irqchip.vpic)
    return kvm_get_apic_interrupt(vcpu)


# --- the guest's port accesses the kernel answers --------------------------------------------

PIC_DEVICES = ((0x20, 2), (0xA0, 2), (0x4D0, 2))  # master, slave, ELCR: (base, length)


def kernel_pio(vcpu: Any, port: int, size: int, is_in: bool, value: int) -> int | None:
    """kvm_io_bus for an IN/OUT: the PIC's ports are answered here, with no exit.

    Returns None if no in-kernel device claims the port, else the value read (0 for OUT).
    An access wider than a byte is claimed and does nothing (reads 0), as in KVM.
    """
    kvm = vcpu.kvm
    chip = kvm.arch.irqchip
    pio_bus = kvm.buses[eventfd.KVM_PIO_BUS]
    if chip is None and not pio_bus:
        return None  # no in-kernel device and no ioeventfd: the common exit stays cheap
    data = value.to_bytes(size, "little")
    if (
        not is_in
        and port in pio_bus
        and eventfd.kvm_io_bus_write(kvm, eventfd.KVM_PIO_BUS, port, data)
    ):
        return 0  # an ioeventfd took it
    pit = x86_i8254.pit_pio(kvm, port, size, is_in, value)
    if pit is not None:
        return pit
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
