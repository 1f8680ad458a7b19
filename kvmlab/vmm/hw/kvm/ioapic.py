"""The IOAPIC in KVM, as QEMU's kvm-ioapic sees it (hw/i386/kvm/ioapic.c).

KVM_CREATE_IRQCHIP puts an IOAPIC at 0xfec00000 in the kernel: the guest's accesses to its
page never exit, and GSIs 0-23 reach its pins through KVM_IRQ_LINE. This model holds the
page on the MMIO bus, reads the 24 redirection entries (KVM_GET_IRQCHIP, chip 2) and puts the
power-on state back at a machine reset (KVM_SET_IRQCHIP).
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/hw/i386/kvm/ioapic.c
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/ioapic.c
"""

from __future__ import annotations

from kvmlab.uapi import (
    KVM_GET_IRQCHIP,
    KVM_IRQCHIP_IOAPIC,
    KVM_SET_IRQCHIP,
    kvm_ioapic_state,
    kvm_irqchip,
)
from kvmlab.vmm.kvm_all import KVMState
from kvmlab.vmm.memory import MmioDevice

IO_APIC_DEFAULT_ADDRESS = 0xFEC00000
IOAPIC_SPACE_SIZE = 0x1000


class KVMIOAPIC(MmioDevice):
    """The in-kernel IOAPIC's page: its state in KVM, its reset."""

    name = "kvm-ioapic"

    def __init__(self, kvm: KVMState) -> None:
        self.kvm = kvm
        self.power_on = self.kvm_ioapic_get()  # every pin masked, as KVM created it

    def kvm_ioapic_get(self) -> kvm_ioapic_state:
        """KVM_GET_IRQCHIP for chip 2: ID, IRR and the redirection table."""
        chip = kvm_irqchip(chip_id=KVM_IRQCHIP_IOAPIC)
        self.kvm.k.ioctl(self.kvm.vmfd, KVM_GET_IRQCHIP, chip)
        return kvm_ioapic_state.from_buffer_copy(chip.chip.ioapic)

    def kvm_ioapic_put(self, state: kvm_ioapic_state) -> None:
        """KVM_SET_IRQCHIP for chip 2."""
        chip = kvm_irqchip(chip_id=KVM_IRQCHIP_IOAPIC)
        chip.chip.ioapic = state
        self.kvm.k.ioctl(self.kvm.vmfd, KVM_SET_IRQCHIP, chip)

    def reset(self) -> None:
        """Machine reset: the IOAPIC as KVM created it (QEMU's ioapic_reset_common: all masked)."""
        self.kvm_ioapic_put(self.power_on)
