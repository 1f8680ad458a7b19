"""Chip logic shared by the simulated kernel's devices and the VMM's device models.

Below `kvmlab.kernel` and `kvmlab.vmm`, importing neither: KVM's in-kernel 8259 and QEMU's
descend from the same code and share its core here; each side keeps its own names and quirks.
"""
