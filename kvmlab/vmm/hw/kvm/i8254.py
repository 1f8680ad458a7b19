"""The 8254 in KVM, as QEMU's kvm-pit sees it (hw/i386/kvm/i8254.c).

KVM_CREATE_PIT2 puts the PIT in the kernel: ports 0x40-0x43 never exit, and channel 0's timer
raises GSI 0 inside KVM. Created with flags 0, as QEMU creates it, KVM does not claim the
speaker port 0x61, so the PC's port 0x61 (`PCSpk`) stays in userspace and reaches channel 2
through this model: `get_channel_info` reads the channels (KVM_GET_PIT2) and `set_gate` writes
the gate back (KVM_SET_PIT2). KVM stamps each channel's count_load_time on CLOCK_MONOTONIC,
which is the machine's clock too: QEMU converts between the two, kvmlab has nothing to convert.
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/hw/i386/kvm/i8254.c
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/i8254.c
"""

from __future__ import annotations

from kvmlab.hw.i8254 import PIT_CHANNEL_STATE_FIELDS
from kvmlab.uapi import (
    KVM_CAP_PIT2,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_PIT2,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    kvm_pit_config,
    kvm_pit_state2,
)
from kvmlab.vmm.hw.i8254 import PITChannel, PITChannelInfo, pit_get_channel_info_common
from kvmlab.vmm.kvm_all import KVMState
from kvmlab.vmm.memory import Device
from kvmlab.vmm.timer import Clock


def kvm_pit_init(kvm: KVMState) -> None:
    """KVM_CREATE_PIT2 with flags 0 (QEMU's kvm_pit_realizefn): it needs the irqchip first."""
    if not kvm.k.ioctl(kvm.fd, KVM_CHECK_EXTENSION, KVM_CAP_PIT2):
        raise RuntimeError("KVM lacks KVM_CAP_PIT2: no in-kernel PIT")
    kvm.k.ioctl(kvm.vmfd, KVM_CREATE_PIT2, kvm_pit_config(flags=0))


class KVMPit(Device):
    """The in-kernel PIT: ports 0x40-0x43 held on the bus, channels read and written in KVM."""

    name = "kvm-pit"

    def __init__(self, kvm: KVMState, clock: Clock) -> None:
        self.kvm = kvm
        self.clock = clock
        self.channels = [PITChannel(i, clock) for i in range(3)]
        self.flags = 0  # KVM_PIT_FLAGS_*
        kvm_pit_init(kvm)
        self.power_on = self._get_pit2()  # KVM's fresh PIT: no channel counts (mode 0xff)

    def _get_pit2(self) -> kvm_pit_state2:
        state = kvm_pit_state2()
        self.kvm.k.ioctl(self.kvm.vmfd, KVM_GET_PIT2, state)
        return state

    def kvm_pit_get(self) -> None:
        """KVM_GET_PIT2 into `channels` and `flags`."""
        self._load(self._get_pit2())

    def _load(self, state: kvm_pit_state2) -> None:
        self.flags = state.flags
        for channel, kchan in zip(self.channels, state.channels, strict=True):
            for name in PIT_CHANNEL_STATE_FIELDS:
                setattr(channel, name, getattr(kchan, name))

    def kvm_pit_put(self) -> None:
        """KVM_SET_PIT2 from `channels` and `flags` (KVM reloads channel 0's timer)."""
        state = kvm_pit_state2(flags=self.flags)
        for channel, kchan in zip(self.channels, state.channels, strict=True):
            for name in PIT_CHANNEL_STATE_FIELDS:
                setattr(kchan, name, int(getattr(channel, name)))
        self.kvm.k.ioctl(self.kvm.vmfd, KVM_SET_PIT2, state)

    def get_channel_info(self, index: int) -> PITChannelInfo:
        """A channel's gate and OUT pin now, from KVM (kvm_pit_get_channel_info)."""
        self.kvm_pit_get()
        return pit_get_channel_info_common(self.channels[index], self.clock())

    def set_gate(self, index: int, gate: bool) -> None:
        """A rising gate restarts the count in modes 1, 2, 3 and 5 (kvm_pit_set_gate)."""
        self.kvm_pit_get()
        channel = self.channels[index]
        if gate and not channel.gate and channel.mode in (1, 2, 3, 5):
            channel.count_load_time = self.clock()
        channel.gate = gate
        self.kvm_pit_put()

    def reset(self) -> None:
        """Machine reset: the PIT as KVM_CREATE_PIT2 made it, no channel counting until the
        guest programs one, as the userspace I8254 after its reset (QEMU's kvm_pit_reset
        would start channel 0 in mode 3, a BIOS's 18.2 Hz tick)."""
        self._load(self.power_on)
        now = self.clock()
        for channel in self.channels:
            channel.count_load_time = now
        self.kvm_pit_put()
