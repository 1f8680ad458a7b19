"""The 8254 programmable interval timer of a PC, with QEMU's semantics (hw/timer/i8254.c).

Three 16-bit down-counters clocked at 1.193182 MHz. Channel 0's output is ISA IRQ 0 (the
timer interrupt); channel 2's gate and output are wired to port 0x61 (the PC speaker port,
which kernels use to calibrate their clocks). The guest writes a control word to port 0x43
(channel, access mode lobyte/hibyte/both, counting mode 0-5, BCD) and the count to port
0x40 + channel; it reads a counter live, latched (counter-latch command) or with its status
(read-back command). Counters are not stepped: like QEMU, kvmlab derives a counter's value and
output from the time since its count was loaded, and arms a timer for the next change of
channel 0's output. The registers, the counting and the port protocol are the core KVM's PIT
shares (`kvmlab.hw.i8254`); QEMU's reset state, its clock and its IRQ timer are here.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/timer/i8254.c
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvmlab.hw.i8254 import PIT_FREQ, RW_STATE_LSB, PitChannelCore, PitCore, ns_to_ticks
from kvmlab.vmm.memory import Device
from kvmlab.vmm.timer import NANOSECONDS_PER_SECOND, Clock, TimerList

PIT_IOBASE, PIT_IOSIZE, PIT_IRQ = 0x40, 4, 0
PCSPK_IOBASE = 0x61
MAX_LAG_NS = 50_000_000  # a timer later than this (host busy) drops the ticks it missed


def ticks_since(load_time: int, now: int) -> int:
    """Whole PIT clock ticks between two clock readings."""
    return ns_to_ticks(now - load_time)


def ticks_to_ns(ticks: int) -> int:
    """The first clock reading at which `ticks` whole ticks have passed (rounded up, so that
    ticks_since() of it is never one short)."""
    return -(-ticks * NANOSECONDS_PER_SECOND // PIT_FREQ)


class PITChannel(PitChannelCore):
    """One counter: its programming, its latches and the time its count was loaded."""

    def __init__(self, index: int, clock: Clock) -> None:
        super().__init__(index)
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Like QEMU's pit_reset_common, but mode 0 (QEMU's is 3), lobyte access, counting
        from 65536 now: no channel makes interrupts until the guest programs one."""
        self.count = 0x10000
        self.latched_count = self.count_latched = self.status_latched = self.status = 0
        self.read_state = self.write_state = self.rw_mode = RW_STATE_LSB
        self.write_latch = self.mode = self.bcd = 0
        self.count_load_time = self.clock()

    def get_count(self, now: int) -> int:
        """The counter's value at `now`."""
        return self.count_after(ticks_since(self.count_load_time, now))

    def get_out(self, now: int) -> bool:
        """The OUT pin at `now`."""
        return self.out_after(ticks_since(self.count_load_time, now))

    def next_transition_time(self, now: int) -> int:
        """When OUT changes next, on the clock; -1 if it never will."""
        d = ticks_since(self.count_load_time, now)
        count = self.count
        if self.mode in (0, 1):
            if d >= count:
                return -1
            next_tick = count
        elif self.mode == 2:  # OUT is high for the one tick at each multiple of the count
            next_tick = d + 1 if d % count == 0 and d != 0 else (d // count + 1) * count
        elif self.mode == 3:
            base = d // count * count
            half = (count + 1) >> 1
            next_tick = base + half if d - base < half else base + count
        elif d < count:
            next_tick = count
        elif d == count:
            next_tick = count + 1
        else:
            return -1
        expire = self.count_load_time + ticks_to_ns(next_tick)
        return expire if expire > now else now + 1  # rounding must not go backwards


@dataclass(frozen=True)
class PITChannelInfo:
    """What a board reads of a channel (QEMU's PITChannelInfo): port 0x61 shows gate and OUT."""

    gate: bool
    mode: int
    initial_count: int
    out: bool


def pit_get_channel_info_common(channel: PITChannel, now: int) -> PITChannelInfo:
    """A channel's gate, mode, count and OUT pin at `now` (QEMU's pit_get_channel_info_common)."""
    return PITChannelInfo(bool(channel.gate), channel.mode, channel.count, channel.get_out(now))


class PITCommon(Protocol):
    """What port 0x61 needs of a PIT, QEMU's model or KVM's (PITCommonClass's get_channel_info
    and set_channel_gate)."""

    def get_channel_info(self, index: int) -> PITChannelInfo: ...

    def set_gate(self, index: int, gate: bool) -> None: ...


class I8254(PitCore, Device):
    """Ports 0x40-0x43; channel 0's OUT drives `on_irq` (ISA IRQ 0) through a machine timer."""

    name = "pit"
    channels: list[PITChannel]

    def __init__(self, timers: TimerList, on_irq: Callable[[bool], None]) -> None:
        self.clock = timers.clock
        super().__init__([PITChannel(i, self.clock) for i in range(3)])
        self.on_irq = on_irq
        self.irq_timer = timers.timer_new(self._irq_timer)
        self.next_transition_time = -1
        self.irq_level = False
        self.irqs = 0  # rising edges of IRQ 0 so far (a figure for notebooks and benchmarks)

    def reset(self) -> None:
        for channel in self.channels:
            channel.reset()
        self.irq_timer.timer_del()
        self.next_transition_time = -1
        self._set_irq(False)

    # --- IRQ 0 ----------------------------------------------------------------------------

    def _set_irq(self, level: bool) -> None:
        if level and not self.irq_level:
            self.irqs += 1
        self.irq_level = level
        self.on_irq(level)

    def irq_timer_update(self, current_time: int) -> None:
        """Drive IRQ 0 from channel 0's OUT at `current_time` and arm the next change."""
        channel = self.channels[0]
        expire = channel.next_transition_time(current_time)
        self._set_irq(channel.get_out(current_time))
        self.next_transition_time = expire
        if expire >= 0:
            self.irq_timer.timer_mod(expire)
        else:
            self.irq_timer.timer_del()

    def _irq_timer(self) -> None:
        when = self.next_transition_time
        now = self.clock()
        if now - when > MAX_LAG_NS:  # catching up tick by tick would be an interrupt storm
            when = now
        self.irq_timer_update(when)

    # --- the core's hooks -------------------------------------------------------------------

    def elapsed_ticks(self, channel: PitChannelCore) -> int:
        return ticks_since(channel.count_load_time, self.clock())

    def load_count(self, channel: PitChannelCore, value: int) -> None:
        """pit_load_count: the count, its load time, and channel 0's next OUT change."""
        channel.count = value or 0x10000
        channel.count_load_time = self.clock()
        if channel.index == 0:
            self.irq_timer_update(channel.count_load_time)

    # --- the ports --------------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        self.ioport_write(offset, value)

    def read(self, offset: int, size: int) -> int:
        if offset == 3:
            return 0xFF  # the control register cannot be read
        return self.ioport_read(offset)

    # --- channel 2's gate (port 0x61) ----------------------------------------------------------

    def get_channel_info(self, index: int) -> PITChannelInfo:
        return pit_get_channel_info_common(self.channels[index], self.clock())

    def set_gate(self, index: int, gate: bool) -> None:
        """A rising gate restarts the count in modes 1, 2, 3 and 5 (pit_set_gate)."""
        channel = self.channels[index]
        if gate and not channel.gate and channel.mode in (1, 2, 3, 5):
            channel.count_load_time = self.clock()
            if index == 0:
                self.irq_timer_update(channel.count_load_time)
        channel.gate = int(gate)


class PCSpk(Device):
    """Port 0x61: channel 2's gate (bit 0) and speaker data (bit 1); reads add channel 2's OUT
    (bit 5) and the DRAM refresh bit (bit 4), which toggles on every read as in QEMU. The PIT
    behind it is QEMU's model (I8254) or KVM's (vmm.hw.kvm.i8254.KVMPit): a PC keeps this port
    in userspace either way."""

    name = "pcspk"

    def __init__(self, pit: PITCommon) -> None:
        self.pit = pit
        self.data_on = False
        self.refresh = 0

    def reset(self) -> None:
        self.data_on = False
        self.refresh = 0

    def read(self, offset: int, size: int) -> int:
        info = self.pit.get_channel_info(2)
        self.refresh ^= 1 << 4
        return info.gate | self.data_on << 1 | self.refresh | info.out << 5

    def write(self, offset: int, size: int, value: int) -> None:
        self.pit.set_gate(2, bool(value & 1))
        self.data_on = bool(value & 2)
