"""The core of the 8254 programmable interval timer, shared by KVM's and QEMU's models.

Linux's arch/x86/kvm/i8254.c was written from QEMU's hw/timer/i8254.c, and both still keep the
same registers per channel (the fields of `struct kvm_pit_channel_state`), derive a counter's
value and its OUT pin from the clock ticks since its count was loaded instead of stepping it,
and decode the control word, the latch and read-back commands and the byte-wise count access
the same way. They differ in where the elapsed time comes from (KVM reads channel 0's from its
hrtimer), in what loading a count does (each arms its own timer) and in their reset state;
each subclass supplies those (`elapsed_ticks`, `load_count`).
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/i8254.c
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/timer/i8254.c
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmlab.uapi import kvm_pit_channel_state

PIT_FREQ = 1_193_182  # Hz: the PC's 14.31818 MHz crystal divided by 12
NSEC_PER_SEC = 1_000_000_000
RW_STATE_LSB, RW_STATE_MSB, RW_STATE_WORD0, RW_STATE_WORD1 = 1, 2, 3, 4
PIT_CHANNEL_STATE_FIELDS = tuple(field[0] for field in kvm_pit_channel_state._fields_)


def ns_to_ticks(ns: int) -> int:
    """Whole PIT clock ticks in `ns` nanoseconds (mul_u64_u32_div(t, PIT_FREQ, NSEC_PER_SEC))."""
    return ns * PIT_FREQ // NSEC_PER_SEC


class PitChannelCore:
    """One counter's registers and what its value and OUT pin are `d` ticks after loading."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.count = 0x10000  # the initial count; a written 0 means 65536
        self.latched_count = 0
        self.count_latched = 0  # which byte(s) of latched_count are still to be read
        self.status_latched = 0
        self.status = 0
        self.read_state = self.write_state = self.rw_mode = 0
        self.write_latch = 0  # the low byte of a lobyte/hibyte count, until the high one
        self.mode = 0
        self.bcd = 0  # accepted and reported; counting stays binary in both models
        self.gate = int(index != 2)  # channel 2's gate is port 0x61's bit 0
        self.count_load_time = 0

    def count_after(self, d: int) -> int:
        """The counter `d` ticks after the count was loaded (pit_get_count)."""
        if self.mode in (0, 1, 4, 5):  # one-shot modes wrap around to 0xffff and go on
            return (self.count - d) & 0xFFFF
        if self.mode == 3:  # square wave: counts down by two (not exact for odd counts)
            return self.count - (2 * d) % self.count
        return self.count - d % self.count  # mode 2 (and any other value): reload at zero

    def out_after(self, d: int) -> bool:
        """The OUT pin `d` ticks after the count was loaded (pit_get_out)."""
        if self.mode == 1:
            return d < self.count
        if self.mode == 2:  # low for the one tick at each multiple of the count
            return d % self.count == 0 and d != 0
        if self.mode == 3:
            return d % self.count < (self.count + 1) >> 1
        if self.mode in (4, 5):  # a one-tick strobe at the terminal count
            return d == self.count
        return d >= self.count  # mode 0 (and any other value): high at the terminal count


class PitCore:
    """Three channels and the guest's port protocol: ports 0-2 are the counters, 3 the
    control word (write only; each model answers its read itself)."""

    def __init__(self, channels: Sequence[PitChannelCore]) -> None:
        self.channels = channels

    # --- what each model decides ---------------------------------------------------------

    def elapsed_ticks(self, channel: PitChannelCore) -> int:
        """Ticks since the channel's count was loaded, on this model's clock."""
        raise NotImplementedError

    def load_count(self, channel: PitChannelCore, value: int) -> None:
        """A count was written (0 means 65536): store it and restart counting."""
        raise NotImplementedError

    # --- the counter -----------------------------------------------------------------------

    def get_count(self, channel: PitChannelCore) -> int:
        return channel.count_after(self.elapsed_ticks(channel))

    def get_out(self, channel: PitChannelCore) -> bool:
        return channel.out_after(self.elapsed_ticks(channel))

    def latch_count(self, channel: PitChannelCore) -> None:
        """Freeze the current count until it is read (a second latch before that is lost)."""
        if not channel.count_latched:
            channel.latched_count = self.get_count(channel) & 0xFFFF
            channel.count_latched = channel.rw_mode

    def latch_status(self, channel: PitChannelCore) -> None:
        """Read-back's status byte: OUT, access mode, counting mode, BCD (no NULL COUNT)."""
        if not channel.status_latched:
            out = self.get_out(channel)
            mode = channel.rw_mode << 4 | channel.mode << 1 | channel.bcd
            channel.status = (out << 7 | mode) & 0xFF
            channel.status_latched = 1

    # --- the ports -------------------------------------------------------------------------

    def ioport_write(self, offset: int, value: int) -> None:
        """A guest write to port 0-2 (a count byte) or 3 (the control word)."""
        value &= 0xFF
        if offset == 3:
            self.control_word(value)
            return
        channel = self.channels[offset]
        if channel.write_state == RW_STATE_MSB:
            self.load_count(channel, value << 8)
        elif channel.write_state == RW_STATE_WORD0:
            channel.write_latch = value
            channel.write_state = RW_STATE_WORD1
        elif channel.write_state == RW_STATE_WORD1:
            self.load_count(channel, channel.write_latch | value << 8)
            channel.write_state = RW_STATE_WORD0
        else:  # RW_STATE_LSB, and what a channel never programmed has (KVM's reset: 0)
            self.load_count(channel, value)

    def control_word(self, value: int) -> None:
        """Port 3: program a channel, latch its count, or read back several channels."""
        select = value >> 6
        if select == 3:  # read-back: bits 3-1 pick channels; bit 5 low latches the
            for channel in self.channels:  # count, bit 4 low the status
                if value & (2 << channel.index):
                    if not value & 0x20:
                        self.latch_count(channel)
                    if not value & 0x10:
                        self.latch_status(channel)
            return
        channel = self.channels[select]
        access = (value >> 4) & 3
        if access == 0:  # counter latch command
            self.latch_count(channel)
            return
        channel.rw_mode = channel.read_state = channel.write_state = access
        mode = (value >> 1) & 7
        channel.mode = mode - 4 if mode > 5 else mode  # 6 and 7 are aliases of 2 and 3
        channel.bcd = value & 1

    def ioport_read(self, offset: int) -> int:
        """A guest read of counter 0-2: a latched status, else a latched count, else the
        live count, a byte at a time as the access mode says."""
        channel = self.channels[offset]
        if channel.status_latched:
            channel.status_latched = 0
            return channel.status
        if channel.count_latched:
            latched = channel.latched_count
            if channel.count_latched == RW_STATE_MSB:
                channel.count_latched = 0
                return latched >> 8
            if channel.count_latched == RW_STATE_WORD0:  # low byte now, high byte next
                channel.count_latched = RW_STATE_MSB
                return latched & 0xFF
            channel.count_latched = 0
            return latched & 0xFF
        state = channel.read_state
        count = self.get_count(channel)
        if state == RW_STATE_WORD0:
            channel.read_state = RW_STATE_WORD1
        elif state == RW_STATE_WORD1:
            channel.read_state = RW_STATE_WORD0
        if state in (RW_STATE_MSB, RW_STATE_WORD1):
            return (count >> 8) & 0xFF
        return count & 0xFF
