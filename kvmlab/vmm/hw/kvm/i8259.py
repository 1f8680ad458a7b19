"""The two 8259s in KVM, as QEMU's kvm-i8259 sees them (hw/i386/kvm/i8259.c).

KVM answers the guest's accesses to ports 0x20/0x21, 0xa0/0xa1 and the ELCR at 0x4d0/0x4d1
itself, so each chip here only holds its place on the port bus. A device raises an ISA line
with `kvm_pic_set_irq`, which is KVM_IRQ_LINE: KVM routes GSI 0-15 to both the PIC pin and the
IOAPIC pin of that number (QEMU's gsi_handler also calls kvm_ioapic_set_irq for the same GSI;
one call does what both do). `kvm_pic_get` reads a chip's registers (KVM_GET_IRQCHIP) and
`reset` puts back the state KVM gave the chip when the irqchip was created (KVM_SET_IRQCHIP).
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/hw/i386/kvm/i8259.c
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/i8259.c
"""

from __future__ import annotations

from kvmlab.uapi import (
    KVM_GET_IRQCHIP,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_SET_IRQCHIP,
    kvm_irqchip,
    kvm_pic_state,
)
from kvmlab.vmm.kvm_all import KVMState, kvm_set_irq
from kvmlab.vmm.memory import Device

ISA_NUM_IRQS = 16


class KVMPicChip(Device):
    """One in-kernel 8259 (chip 0, the master, or 1, the slave): its port range, its state."""

    def __init__(self, kvm: KVMState, master: bool) -> None:
        self.kvm = kvm
        self.name = "kvm-pic"
        self.chip_id = KVM_IRQCHIP_PIC_MASTER if master else KVM_IRQCHIP_PIC_SLAVE
        self.power_on = self.kvm_pic_get()  # what KVM_CREATE_IRQCHIP made: the reset state

    def kvm_pic_get(self) -> kvm_pic_state:
        """KVM_GET_IRQCHIP: the chip's registers now (IRR, IMR, ISR, vector base, ...)."""
        chip = kvm_irqchip(chip_id=self.chip_id)
        self.kvm.k.ioctl(self.kvm.vmfd, KVM_GET_IRQCHIP, chip)
        return kvm_pic_state.from_buffer_copy(chip.chip.pic)

    def kvm_pic_put(self, state: kvm_pic_state) -> None:
        """KVM_SET_IRQCHIP: load the chip's registers."""
        chip = kvm_irqchip(chip_id=self.chip_id)
        chip.chip.pic = state
        self.kvm.k.ioctl(self.kvm.vmfd, KVM_SET_IRQCHIP, chip)

    def reset(self) -> None:
        """Machine reset: the chip as KVM created it (QEMU's kvm_pic_reset computes the same
        power-on values: everything clear, the ELCR too)."""
        self.kvm_pic_put(self.power_on)


class KVMPic:
    """The PC's pair in KVM: `master` (ports 0x20-0x21), `slave` (0xa0-0xa1), ISA lines 0-15."""

    def __init__(self, kvm: KVMState) -> None:
        self.kvm = kvm
        self.master = KVMPicChip(kvm, master=True)
        self.slave = KVMPicChip(kvm, master=False)
        self.irqs = 0  # rising edges raised through KVM_IRQ_LINE (QEMU's pic_stat_update_irq)
        self.levels = 0  # bit n: the level last set on line n

    def kvm_pic_set_irq(self, irq: int, level: bool) -> int:
        """ISA line `irq` (0-15) is now at `level`: KVM_IRQ_LINE (kvm_set_irq); KVM's answer."""
        if not 0 <= irq < ISA_NUM_IRQS:
            raise ValueError(f"no ISA interrupt line {irq}")
        bit = 1 << irq
        if level and not self.levels & bit:
            self.irqs += 1
        self.levels = self.levels | bit if level else self.levels & ~bit
        return kvm_set_irq(self.kvm, irq, int(level))

    def set_irq(self, irq: int, level: bool) -> None:
        """The ISA interface every board PIC has (the userspace I8259's too)."""
        self.kvm_pic_set_irq(irq, level)
