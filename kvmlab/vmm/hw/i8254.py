"""The 8254 programmable interval timer of a PC, with QEMU's semantics (hw/timer/i8254.c).

Three 16-bit down-counters clocked at 1.193182 MHz. Channel 0's output is ISA IRQ 0 (the
timer interrupt); channel 2's gate and output are wired to port 0x61 (the PC speaker port,
which kernels use to calibrate their clocks). The guest writes a control word to port 0x43
(channel, access mode lobyte/hibyte/both, counting mode 0-5, BCD) and the count to port
0x40 + channel; it reads a counter live, latched (counter-latch command) or with its status
(read-back command). Counters are not stepped: like QEMU, kvmlab derives a counter's value and
output from the time since its count was loaded, and arms a timer for the next change of
channel 0's output.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/timer/i8254.c
"""

from __future__ import annotations

from collections.abc import Callable

from kvmlab.vmm.memory import Device
from kvmlab.vmm.timer import NANOSECONDS_PER_SECOND, Clock, TimerList

PIT_IOBASE, PIT_IOSIZE, PIT_IRQ = 0x40, 4, 0
PCSPK_IOBASE = 0x61
PIT_FREQ = 1_193_182  # Hz
RW_STATE_LSB, RW_STATE_MSB, RW_STATE_WORD0, RW_STATE_WORD1 = 1, 2, 3, 4
MAX_LAG_NS = 50_000_000  # a timer later than this (host busy) drops the ticks it missed


def ticks_since(load_time: int, now: int) -> int:
    """Whole PIT clock ticks between two clock readings."""
    return (now - load_time) * PIT_FREQ // NANOSECONDS_PER_SECOND


def ticks_to_ns(ticks: int) -> int:
    """The first clock reading at which `ticks` whole ticks have passed (rounded up, so that
    ticks_since() of it is never one short)."""
    return -(-ticks * NANOSECONDS_PER_SECOND // PIT_FREQ)


class PITChannel:
    """One counter: its programming, its latches and the time its count was loaded."""

    def __init__(self, index: int, clock: Clock) -> None:
        self.index = index
        self.clock = clock
        self.gate = index != 2  # channels 0 and 1 are always enabled; 2 is gated by port 0x61
        self.reset()

    def reset(self) -> None:
        self.count = 0x10000  # a written 0 means 65536
        self.latched_count = 0
        self.count_latched = 0  # which byte(s) of latched_count are still to be read
        self.status_latched = False
        self.status = 0
        self.read_state = self.write_state = self.rw_mode = RW_STATE_LSB
        self.write_latch = 0
        self.mode = 0
        self.bcd = False  # accepted and reported, but counting stays binary (as in QEMU)
        self.count_load_time = self.clock()

    def get_count(self, now: int) -> int:
        """The counter's current value (pit_get_count)."""
        d = ticks_since(self.count_load_time, now)
        if self.mode in (0, 1, 4, 5):
            return (self.count - d) & 0xFFFF
        if self.mode == 3:  # square wave counts down by two
            return self.count - ((2 * d) % self.count)
        return self.count - (d % self.count)  # mode 2, rate generator

    def get_out(self, now: int) -> bool:
        """The OUT pin (pit_get_out)."""
        d = ticks_since(self.count_load_time, now)
        if self.mode == 0:
            return d >= self.count
        if self.mode == 1:
            return d < self.count
        if self.mode == 2:
            return d % self.count == 0 and d != 0
        if self.mode == 3:
            return d % self.count < (self.count + 1) >> 1
        return d == self.count  # modes 4 and 5: a one-tick strobe

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

    def latch_count(self, now: int) -> None:
        if not self.count_latched:
            self.latched_count = self.get_count(now)
            self.count_latched = self.rw_mode


class I8254(Device):
    """Ports 0x40-0x43; channel 0's OUT drives `on_irq` (ISA IRQ 0) through a machine timer."""

    name = "pit"

    def __init__(self, timers: TimerList, on_irq: Callable[[bool], None]) -> None:
        self.clock = timers.clock
        self.channels = [PITChannel(i, self.clock) for i in range(3)]
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

    def _load_count(self, channel: PITChannel, value: int) -> None:
        channel.count = value or 0x10000
        channel.count_load_time = self.clock()
        if channel.index == 0:
            self.irq_timer_update(channel.count_load_time)

    # --- the ports --------------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        now = self.clock()
        if offset == 3:
            self._control_word(value, now)
            return
        channel = self.channels[offset]
        if channel.write_state == RW_STATE_LSB:
            self._load_count(channel, value)
        elif channel.write_state == RW_STATE_MSB:
            self._load_count(channel, value << 8)
        elif channel.write_state == RW_STATE_WORD0:
            channel.write_latch = value
            channel.write_state = RW_STATE_WORD1
        else:
            self._load_count(channel, channel.write_latch | value << 8)
            channel.write_state = RW_STATE_WORD0

    def _control_word(self, value: int, now: int) -> None:
        select = value >> 6
        if select == 3:  # read-back: latch the count and/or status of the selected channels
            for channel in self.channels:
                if not value & (2 << channel.index):
                    continue
                if not value & 0x20:
                    channel.latch_count(now)
                if not value & 0x10 and not channel.status_latched:
                    channel.status = (
                        channel.get_out(now) << 7
                        | channel.rw_mode << 4
                        | channel.mode << 1
                        | channel.bcd
                    )
                    channel.status_latched = True
            return
        channel = self.channels[select]
        access = (value >> 4) & 3
        if access == 0:  # counter latch command
            channel.latch_count(now)
            return
        channel.rw_mode = channel.read_state = channel.write_state = access
        mode = (value >> 1) & 7
        channel.mode = mode - 4 if mode >= 6 else mode  # 6 and 7 are aliases of 2 and 3
        channel.bcd = bool(value & 1)

    def read(self, offset: int, size: int) -> int:
        if offset == 3:
            return 0xFF  # the control register cannot be read
        channel = self.channels[offset]
        if channel.status_latched:
            channel.status_latched = False
            return channel.status
        if channel.count_latched:
            latched = channel.latched_count
            if channel.count_latched == RW_STATE_LSB:
                channel.count_latched = 0
                return latched & 0xFF
            if channel.count_latched == RW_STATE_MSB:
                channel.count_latched = 0
                return (latched >> 8) & 0xFF
            channel.count_latched = RW_STATE_MSB  # WORD0: low byte now, high byte next
            return latched & 0xFF
        count = channel.get_count(self.clock())
        if channel.read_state == RW_STATE_LSB:
            return count & 0xFF
        if channel.read_state == RW_STATE_MSB:
            return (count >> 8) & 0xFF
        if channel.read_state == RW_STATE_WORD0:
            channel.read_state = RW_STATE_WORD1
            return count & 0xFF
        channel.read_state = RW_STATE_WORD0
        return (count >> 8) & 0xFF

    # --- channel 2's gate (port 0x61) ----------------------------------------------------------

    def set_gate(self, index: int, gate: bool) -> None:
        """A rising gate restarts the count in modes 1, 2, 3 and 5 (pit_set_gate)."""
        channel = self.channels[index]
        if gate and not channel.gate and channel.mode in (1, 2, 3, 5):
            channel.count_load_time = self.clock()
            if index == 0:
                self.irq_timer_update(channel.count_load_time)
        channel.gate = gate


class PCSpk(Device):
    """Port 0x61: channel 2's gate (bit 0) and speaker data (bit 1); reads add channel 2's OUT
    (bit 5) and the DRAM refresh bit (bit 4), which toggles on every read as in QEMU."""

    name = "pcspk"

    def __init__(self, pit: I8254) -> None:
        self.pit = pit
        self.data_on = False
        self.refresh = 0

    def reset(self) -> None:
        self.data_on = False
        self.refresh = 0

    def read(self, offset: int, size: int) -> int:
        channel = self.pit.channels[2]
        self.refresh ^= 1 << 4
        out = channel.get_out(self.pit.clock())
        return channel.gate | self.data_on << 1 | self.refresh | out << 5

    def write(self, offset: int, size: int, value: int) -> None:
        self.pit.set_gate(2, bool(value & 1))
        self.data_on = bool(value & 2)
