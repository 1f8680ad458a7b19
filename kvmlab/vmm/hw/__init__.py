"""Device models: each a small `Device` that knows registers, never KVM (QEMU's hw/)."""

from kvmlab.vmm.hw.debugcon import DebugCon
from kvmlab.vmm.hw.debugexit import DebugExit
from kvmlab.vmm.hw.pl011 import PL011
from kvmlab.vmm.hw.scratch import ScratchDevice
from kvmlab.vmm.hw.serial import Serial16550

__all__ = ["PL011", "DebugCon", "DebugExit", "ScratchDevice", "Serial16550"]
