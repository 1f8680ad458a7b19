"""The in-kernel 8254 PIT (KVM_CREATE_PIT2), after arch/x86/kvm/i8254.c.

KVM_CREATE_PIT2 needs the in-kernel PIC (KVM_CREATE_IRQCHIP) and puts the PIT on the VM's PIO
bus at ports 0x40-0x43, and with KVM_PIT_SPEAKER_DUMMY port 0x61 too: a guest's IN and OUT
there are answered here, with no exit. The counters, latches and the port protocol are the
8254 core shared with the VMM's QEMU model (`kvmlab.hw.i8254`); what is KVM's own is here:

- the reset state: every channel in mode 0xff (no mode), access mode 0, count 65536;
- channel 0 counts from its hrtimer (elapsed = period - time remaining), the other two from
  their load time; loading channel 0's count in mode 0, 1 or 4 arms a one-shot timer, in
  mode 2 or 3 a periodic one (at least `MIN_TIMER_PERIOD_US`), in any other mode (5 too)
  none. The guest never sets channel 0's count_load_time: GET_PIT2 shows 0 or what SET wrote;
- each expiry runs pit_do_work, which pulses GSI 0 (raise, lower) through `kvm_set_irq`;
- an access is the PIT's only if it lies wholly inside 0x40-0x43 (a word at 0x43 exits); an
  IN gives one byte, zero-extended (0x43 reads 0), an OUT writes its low byte;
- port 0x61 reads channel 2's gate and OUT, the speaker data, and a refresh bit from the clock.

The hrtimer and the kvm-pit worker are one `HrTimer` thread per PIT (`kvmlab.kernel.hrtimer`),
started by the first timer and stopped by kvm_free_pit. As KVM, the PIT starts in
"reinject" mode: an expiry is delivered only once the guest has acknowledged the previous tick
(its EOI reaches the ack notifier on GSI 0), and the expiries that came meanwhile are counted
and replayed one per EOI; KVM_REINJECT_CONTROL turns that off (a pulse per expiry).
https://elixir.bootlin.com/linux/v6.12/source/arch/x86/kvm/i8254.c
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any

from kvmlab.hw.i8254 import (
    NSEC_PER_SEC,
    PIT_CHANNEL_STATE_FIELDS,
    PIT_FREQ,
    PitChannelCore,
    PitCore,
    ns_to_ticks,
)
from kvmlab.kernel.arch.x86 import irq as x86_irq
from kvmlab.kernel.hrtimer import HrTimer
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import (
    KVM_CREATE_PIT,
    KVM_CREATE_PIT2,
    KVM_GET_PIT,
    KVM_GET_PIT2,
    KVM_PIT_FLAGS_HPET_LEGACY,
    KVM_PIT_FLAGS_SPEAKER_DATA_ON,
    KVM_PIT_SPEAKER_DUMMY,
    KVM_REINJECT_CONTROL,
    KVM_SET_PIT,
    KVM_SET_PIT2,
    kvm_pit_channel_state,
    kvm_pit_config,
    kvm_pit_state,
    kvm_pit_state2,
    kvm_reinject_control,
)

KVM_PIT_BASE_ADDRESS, KVM_PIT_MEM_LENGTH = 0x40, 4
KVM_SPEAKER_BASE_ADDRESS, KVM_SPEAKER_MEM_LENGTH = 0x61, 4
MIN_TIMER_PERIOD_US = 200  # the kvm module's min_timer_period_us (the host's is 200 too)


def ktime_get() -> int:
    """CLOCK_MONOTONIC in nanoseconds, the clock of KVM's count_load_time and hrtimer."""
    return time.monotonic_ns()


class KvmPit(PitCore):
    """struct kvm_pit with its struct kvm_kpit_state: the three channels, the flags (HPET
    legacy, speaker data), channel 0's timer, and whether port 0x61 is registered."""

    def __init__(self, kvm: Any, speaker_dev: bool) -> None:
        super().__init__([PitChannelCore(i) for i in range(3)])
        self.kvm = kvm
        self.lock = threading.RLock()  # pit_state.lock
        self.flags = 0
        self.is_periodic = False
        self.period = 0  # ns; 0 until channel 0 first gets a timer
        # ps->timer and the kvm-pit worker in one: the hrtimer's function does both
        self.timer = HrTimer(lambda: pit_timer_expired(self), f"kvm-pit/{os.getpid()}")
        self.speaker_dev = speaker_dev
        # reinject mode: ticks the guest has not acknowledged (`pending`) wait for its EOI
        self.reinject = False
        self.pending = 0
        self.irq_ack = True
        self.ack_lock = threading.Lock()  # KVM's atomics on pending and irq_ack
        self.notifiers: tuple[x86_irq.IrqNotifier, x86_irq.IrqNotifier] | None = None  # ack, mask

    def elapsed_ticks(self, channel: PitChannelCore) -> int:
        return ns_to_ticks(kpit_elapsed(self, channel))

    def load_count(self, channel: PitChannelCore, value: int) -> None:
        pit_load_count(self, channel.index, value)


# --- counting and the timer -------------------------------------------------------------------


def kpit_elapsed(pit: KvmPit, channel: PitChannelCore) -> int:
    """Nanoseconds the channel has counted: channel 0's from its hrtimer (0 if it never had
    one), the others' from count_load_time."""
    if channel.index == 0:
        if not pit.period:
            return 0
        return pit.period - pit.timer.remaining()
    return ktime_get() - channel.count_load_time


def create_pit_timer(pit: KvmPit, val: int, is_period: bool) -> None:
    """Arm channel 0's timer for `val` ticks (none while the HPET stands in for the PIT)."""
    if pit.flags & KVM_PIT_FLAGS_HPET_LEGACY:
        return
    interval = val * NSEC_PER_SEC // PIT_FREQ
    pit.timer.cancel()
    pit.period = interval
    pit.is_periodic = is_period
    kvm_pit_reset_reinject(pit)  # a new count forgets the old timer's unacknowledged ticks
    if is_period and pit.period < MIN_TIMER_PERIOD_US * 1000:
        note("periodic timer limited", requested=pit.period, min=MIN_TIMER_PERIOD_US * 1000)
        pit.period = MIN_TIMER_PERIOD_US * 1000
    pit.timer.start(ktime_get() + interval)


def destroy_pit_timer(pit: KvmPit) -> None:
    pit.timer.cancel()


def pit_load_count(pit: KvmPit, channel: int, val: int) -> None:
    """A new count (0 means 65536); channel 0's mode says which timer it gets."""
    val = val or 0x10000
    c = pit.channels[channel]
    c.count = val
    if channel != 0:
        c.count_load_time = ktime_get()
        return
    if c.mode in (0, 1, 4):
        create_pit_timer(pit, val, False)
    elif c.mode in (2, 3):
        create_pit_timer(pit, val, True)
    else:
        destroy_pit_timer(pit)


def kvm_pit_load_count(pit: KvmPit, channel: int, val: int, hpet_legacy_start: bool) -> None:
    """pit_load_count for KVM_SET_PIT(2); entering HPET legacy mode stops channel 0's timer."""
    if hpet_legacy_start:
        saved_mode = pit.channels[0].mode
        pit.channels[0].mode = 0xFF
        pit_load_count(pit, channel, val)
        pit.channels[0].mode = saved_mode
    else:
        pit_load_count(pit, channel, val)


def pit_set_gate(pit: KvmPit, channel: int, val: int) -> None:
    """A rising gate restarts counting in modes 1, 2, 3 and 5."""
    c = pit.channels[channel]
    if c.mode in (1, 2, 3, 5) and c.gate < val:
        c.count_load_time = ktime_get()
    c.gate = val


def pit_timer_expired(pit: KvmPit) -> int | None:
    """The hrtimer's function and the worker: the next expiry, then the pulse."""
    restart = pit_timer_fn(pit)
    pit_do_work(pit)
    return restart


@traced(args=lambda pit: {"periodic": pit.is_periodic, "period_ns": pit.period})
def pit_timer_fn(pit: KvmPit) -> int | None:
    """The hrtimer expired: a periodic timer goes on exactly one period later, as KVM's
    hrtimer_add_expires_ns does, so a thread that was late fires again at once for each
    period it missed (each counted as pending in reinject mode); a one-shot stops. Takes no
    lock, as in KVM: a reprogram holding the PIT's lock cancels the timer and waits."""
    if pit.reinject:
        with pit.ack_lock:
            pit.pending += 1
    period = pit.period
    if not pit.is_periodic or not period:
        return None
    return pit.timer.expires() + period


@traced()
def pit_do_work(pit: KvmPit) -> None:
    """The worker: an edge on GSI 0 (the PIC's IRQ 0 and the IOAPIC's pin 0). In reinject
    mode only once the guest acknowledged the last tick; the tick stays pending meanwhile."""
    if pit.reinject:
        with pit.ack_lock:
            acked, pit.irq_ack = pit.irq_ack, False
        if not acked:
            note("last tick not acknowledged: this one waits", pending=pit.pending)
            return
    x86_irq.kvm_set_irq(pit.kvm, 0, 1)
    x86_irq.kvm_set_irq(pit.kvm, 0, 0)


@traced(args=lambda pit: {"pending": pit.pending})
def kvm_pit_ack_irq(pit: KvmPit) -> None:
    """The guest's EOI of GSI 0: the tick is done; one still pending is delivered now."""
    with pit.ack_lock:
        pit.irq_ack = True
        pit.pending = max(pit.pending - 1, 0)
        more = pit.pending > 0
    if more:
        pit_do_work(pit)


def pit_mask_notifer(pit: KvmPit, masked: bool) -> None:
    """GSI 0 unmasked: forget the ticks that came while it was masked (kvm_pit_reset_reinject)."""
    if not masked:
        kvm_pit_reset_reinject(pit)


def kvm_pit_reset_reinject(pit: KvmPit) -> None:
    with pit.ack_lock:
        pit.pending, pit.irq_ack = 0, True


@traced(args=lambda pit, reinject: {"reinject": reinject})
def kvm_pit_set_reinject(pit: KvmPit, reinject: bool) -> None:
    """Turn reinject mode on (the ack and mask notifiers on GSI 0) or off."""
    if pit.reinject == reinject:
        return
    kvm = pit.kvm
    if reinject:
        kvm_pit_reset_reinject(pit)
        pit.notifiers = (
            x86_irq.kvm_register_irq_ack_notifier(kvm, 0, lambda: kvm_pit_ack_irq(pit)),
            x86_irq.kvm_register_irq_mask_notifier(
                kvm, 0, lambda masked: pit_mask_notifer(pit, masked)
            ),
        )
    elif pit.notifiers is not None:
        ack, mask = pit.notifiers
        x86_irq.kvm_unregister_irq_ack_notifier(kvm, ack)
        x86_irq.kvm_unregister_irq_mask_notifier(kvm, mask)
        pit.notifiers = None
    pit.reinject = reinject


# --- the guest's ports ------------------------------------------------------------------------


@traced(args=lambda pit, addr, len_, value: {"port": hex(addr), "len": len_, "value": value})
def pit_ioport_write(pit: KvmPit, addr: int, len_: int, value: int) -> None:
    """An OUT to 0x40-0x43: only the low byte counts, whatever the access width."""
    with pit.lock:
        pit.ioport_write(addr & 3, value)


@traced(args=lambda pit, addr, len_: {"port": hex(addr), "len": len_})
def pit_ioport_read(pit: KvmPit, addr: int, len_: int) -> int:
    """An IN from 0x40-0x42: one byte, zero-extended; 0x43 is write-only and reads 0."""
    if addr & 3 == 3:
        return 0
    with pit.lock:
        return pit.ioport_read(addr & 3)


@traced(args=lambda pit, value: {"value": value})
def speaker_ioport_write(pit: KvmPit, value: int) -> None:
    """Port 0x61: bit 1 is the speaker data, bit 0 channel 2's gate."""
    with pit.lock:
        if value & 2:
            pit.flags |= KVM_PIT_FLAGS_SPEAKER_DATA_ON
        else:
            pit.flags &= ~KVM_PIT_FLAGS_SPEAKER_DATA_ON
        pit_set_gate(pit, 2, value & 1)


@traced()
def speaker_ioport_read(pit: KvmPit) -> int:
    """Port 0x61: gate (bit 0), speaker data (1), the refresh clock (4, bit 14 of the
    nanosecond clock: about 16 us per phase) and channel 2's OUT (5)."""
    refresh_clock = (ktime_get() >> 14) & 1
    with pit.lock:
        c = pit.channels[2]
        data_on = bool(pit.flags & KVM_PIT_FLAGS_SPEAKER_DATA_ON)
        return data_on << 1 | c.gate | pit.get_out(c) << 5 | refresh_clock << 4


def in_range(port: int, size: int, base: int, length: int) -> bool:
    """kvm_io_bus_cmp: the whole access lies inside the device's range."""
    return base <= port and port + size <= base + length


def pit_pio(kvm: Any, port: int, size: int, is_in: bool, value: int) -> int | None:
    """A guest IN/OUT the PIT (ports 0x40-0x43, the speaker port 0x61) answers: the value
    read (0 for OUT), or None if the port is not the PIT's."""
    pit: KvmPit | None = kvm.arch.vpit
    if pit is None:
        return None
    if in_range(port, size, KVM_PIT_BASE_ADDRESS, KVM_PIT_MEM_LENGTH):
        if is_in:
            return pit_ioport_read(pit, port, size)
        pit_ioport_write(pit, port, size, value)
        return 0
    speaker = in_range(port, size, KVM_SPEAKER_BASE_ADDRESS, KVM_SPEAKER_MEM_LENGTH)
    if pit.speaker_dev and speaker and port == KVM_SPEAKER_BASE_ADDRESS:
        if is_in:
            return speaker_ioport_read(pit)
        speaker_ioport_write(pit, value)
        return 0
    return None  # 0x62-0x64 are in the speaker's range but refused by it: an exit


# --- creation, state and the end -------------------------------------------------------------


def kvm_pit_reset(pit: KvmPit) -> None:
    """Every channel in mode 0xff with count 65536; channels 0 and 1 gated on."""
    pit.flags = 0
    for i, c in enumerate(pit.channels):
        c.mode = 0xFF
        c.gate = int(i != 2)
        pit_load_count(pit, i, 0)
    kvm_pit_reset_reinject(pit)


@traced(args=lambda kvm, flags: {"flags": flags})
def kvm_create_pit(kvm: Any, flags: int) -> KvmPit:
    """A reset PIT on ports 0x40-0x43, and port 0x61 with KVM_PIT_SPEAKER_DUMMY (other flag
    bits are ignored)."""
    pit = KvmPit(kvm, bool(flags & KVM_PIT_SPEAKER_DUMMY))
    with pit.lock:
        kvm_pit_reset(pit)
    kvm_pit_set_reinject(pit, True)
    return pit


def kvm_free_pit(kvm: Any) -> None:
    """Stop the PIT's timer when the VM goes."""
    pit: KvmPit | None = kvm.arch.vpit
    if pit is not None:
        kvm.arch.vpit = None  # off the PIO bus
        pit.timer.close()


def channel_states(pit: KvmPit) -> list[kvm_pit_channel_state]:
    return [
        kvm_pit_channel_state(*(getattr(c, name) for name in PIT_CHANNEL_STATE_FIELDS))
        for c in pit.channels
    ]


@traced()
def kvm_vm_ioctl_get_pit(kvm: Any, ps: kvm_pit_state) -> None:
    pit: KvmPit = kvm.arch.vpit
    with pit.lock:
        for i, state in enumerate(channel_states(pit)):
            ps.channels[i] = state


@traced()
def kvm_vm_ioctl_set_pit(kvm: Any, ps: kvm_pit_state) -> None:
    """Every register as given, then each count loaded again (channels 1 and 2 restart now)."""
    pit: KvmPit = kvm.arch.vpit
    with pit.lock:
        load_channels(pit, ps.channels)
        for i in range(3):
            kvm_pit_load_count(pit, i, ps.channels[i].count, False)


@traced()
def kvm_vm_ioctl_get_pit2(kvm: Any, ps: kvm_pit_state2) -> None:
    """The channels and the flags; reserved is zeroed."""
    pit: KvmPit = kvm.arch.vpit
    with pit.lock:
        for i, state in enumerate(channel_states(pit)):
            ps.channels[i] = state
        ps.flags = pit.flags


@traced()
def kvm_vm_ioctl_set_pit2(kvm: Any, ps: kvm_pit_state2) -> None:
    """As KVM_SET_PIT, plus the flags (any bits, kept as given); turning HPET legacy mode on
    stops channel 0's timer."""
    pit: KvmPit = kvm.arch.vpit
    with pit.lock:
        start = not pit.flags & KVM_PIT_FLAGS_HPET_LEGACY and ps.flags & KVM_PIT_FLAGS_HPET_LEGACY
        load_channels(pit, ps.channels)
        pit.flags = ps.flags
        for i in range(3):
            kvm_pit_load_count(pit, i, pit.channels[i].count, bool(start) and i == 0)


def load_channels(pit: KvmPit, states: Any) -> None:
    """memcpy of the channels from userspace's struct."""
    for c, state in zip(pit.channels, states, strict=True):
        for name in PIT_CHANNEL_STATE_FIELDS:
            setattr(c, name, getattr(state, name))


def kvm_arch_vm_ioctl_pit(kvm: Any, cmd: int, arg: int) -> int | None:
    """KVM_CREATE_PIT2, KVM_GET/SET_PIT, KVM_GET/SET_PIT2 (in x86.c's order of checks); None
    for any other ioctl."""
    if cmd in (KVM_CREATE_PIT, KVM_CREATE_PIT2):  # the older one means KVM_PIT_SPEAKER_DUMMY
        if cmd == KVM_CREATE_PIT2:
            config = copy_struct_from_user(kvm_pit_config, arg)
        else:
            config = kvm_pit_config(flags=KVM_PIT_SPEAKER_DUMMY)
        with kvm.lock:
            if kvm.arch.vpit is not None:
                note("a PIT exists")
                fail(errno.EEXIST)
            if not x86_irq.pic_in_kernel(kvm):
                note("no in-kernel PIC: KVM_CREATE_IRQCHIP first")
                fail(errno.ENOENT)
            kvm.arch.vpit = kvm_create_pit(kvm, config.flags)
        return 0
    if cmd == KVM_GET_PIT:
        ps = copy_struct_from_user(kvm_pit_state, arg)
        pit_exists(kvm)
        kvm_vm_ioctl_get_pit(kvm, ps)
        copy_to_user(arg, ps)
        return 0
    if cmd == KVM_SET_PIT:
        ps = copy_struct_from_user(kvm_pit_state, arg)
        with kvm.lock:
            pit_exists(kvm)
            kvm_vm_ioctl_set_pit(kvm, ps)
        return 0
    if cmd == KVM_GET_PIT2:
        pit_exists(kvm)
        ps2 = kvm_pit_state2()
        kvm_vm_ioctl_get_pit2(kvm, ps2)
        copy_to_user(arg, ps2)
        return 0
    if cmd == KVM_SET_PIT2:
        ps2 = copy_struct_from_user(kvm_pit_state2, arg)
        with kvm.lock:
            pit_exists(kvm)
            kvm_vm_ioctl_set_pit2(kvm, ps2)
        return 0
    if cmd == KVM_REINJECT_CONTROL:
        control = copy_struct_from_user(kvm_reinject_control, arg)
        pit_exists(kvm)
        with kvm.arch.vpit.lock:
            kvm_pit_set_reinject(kvm.arch.vpit, bool(control.pit_reinject))
        return 0
    return None


def pit_exists(kvm: Any) -> None:
    """ENXIO without KVM_CREATE_PIT2."""
    if kvm.arch.vpit is None:
        fail(errno.ENXIO)
