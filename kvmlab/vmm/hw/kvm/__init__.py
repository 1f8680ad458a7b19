"""The in-kernel irqchip seen from userspace: QEMU's hw/i386/kvm/ (kvm-i8259, kvm-ioapic,
kvm-pit).

With KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2 the chips live in KVM: their ports and registers
never reach the VMM. What is left for userspace is what these models do: claim the chips'
addresses on the buses (so nothing else is put there), raise interrupt lines with
KVM_IRQ_LINE, read and write the chips' state with KVM_GET/SET_IRQCHIP and KVM_GET/SET_PIT2,
and put their power-on state back when the machine resets. Unlike the other device models,
these talk to KVM, through the VMM's syscall face.
https://gitlab.com/qemu-project/qemu/-/tree/v9.1.0/hw/i386/kvm
"""

from kvmlab.vmm.hw.kvm.i8254 import KVMPit
from kvmlab.vmm.hw.kvm.i8259 import KVMPic, KVMPicChip
from kvmlab.vmm.hw.kvm.ioapic import IO_APIC_DEFAULT_ADDRESS, KVMIOAPIC

__all__ = ["IO_APIC_DEFAULT_ADDRESS", "KVMIOAPIC", "KVMPic", "KVMPicChip", "KVMPit"]
