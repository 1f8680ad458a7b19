"""Scenarios for the in-kernel 8254 PIT (KVM_CREATE_PIT2): its creation rules, the reset state
KVM_GET_PIT2 shows, KVM_SET_PIT(2) and back, the guest's ports 0x40-0x43 (and 0x61 with
KVM_PIT_SPEAKER_DUMMY) answered with no exit, and channel 0's timer raising IRQ 0.

A counter's value and its OUT pin change with time, so the scenarios compare only what is
deterministic: latched values within their range, the direction of counting, status bytes
without the OUT bit, and count_load_time of channel 0 (KVM sets it only from SET_PIT(2)).
Handlers report with `out 0x10, al`; with the irqchip in the kernel HLT never exits.
"""

from __future__ import annotations

import ctypes
import itertools
import signal
import time
from typing import Any

from kvmlab.asm import assemble
from kvmlab.uapi import (
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT,
    KVM_CREATE_PIT2,
    KVM_EXIT_IO,
    KVM_GET_PIT,
    KVM_GET_PIT2,
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

from .guest import CODE_ADDR, DATA_ADDR, MAX_RUNS, Fds, Machine, try_ioctl
from .registry import scenario
from .scenarios_irqchip import HANDLER, PIC_INIT, chip_machine, name, pic, pic_guest, set_pic

CHANNEL_FIELDS = [n for n, _ in kvm_pit_channel_state._fields_]
IRQ0_VECTOR = 0x20  # where PIC_INIT puts IRQ 0


def asm(source: str) -> bytes:
    return assemble(source, mode="16", base=CODE_ADDR).code


def create_pit(k: Any, vm_fd: int, flags: int = 0) -> int | str:
    return try_ioctl(k, vm_fd, KVM_CREATE_PIT2, bytes(kvm_pit_config(flags=flags)))


def channels(state: kvm_pit_state | kvm_pit_state2) -> list[dict[str, int]]:
    return [{f: getattr(c, f) for f in CHANNEL_FIELDS} for c in state.channels]


def get_pit2(k: Any, vm_fd: int) -> kvm_pit_state2 | str:
    buf = bytearray(ctypes.sizeof(kvm_pit_state2))
    r = try_ioctl(k, vm_fd, KVM_GET_PIT2, buf)
    return r if isinstance(r, str) else kvm_pit_state2.from_buffer_copy(buf)


def get_pit(k: Any, vm_fd: int) -> kvm_pit_state | str:
    buf = bytearray(ctypes.sizeof(kvm_pit_state))
    r = try_ioctl(k, vm_fd, KVM_GET_PIT, buf)
    return r if isinstance(r, str) else kvm_pit_state.from_buffer_copy(buf)


def pit2(k: Any, vm_fd: int) -> kvm_pit_state2:
    state = get_pit2(k, vm_fd)
    assert not isinstance(state, str), state
    return state


def run_exits(m: Machine, last_port: int, *, limit: float = 5.0) -> list[tuple[Any, ...]]:
    """KVM_RUN until an OUT to `last_port`: every IO exit as (port, size, direction); an IN is
    answered with 0xee bytes. A SIGALRM after `limit` seconds bounds a guest that sleeps."""
    exits: list[tuple[Any, ...]] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    try:
        for _ in range(MAX_RUNS):
            signal.setitimer(signal.ITIMER_REAL, limit)
            r = m.try_run()
            signal.setitimer(signal.ITIMER_REAL, 0)
            if r != KVM_EXIT_IO:
                exits.append((r if isinstance(r, str) else name(r),))
                break
            io = m.io()
            exits.append((io["port"], io["size"], io["direction"]))
            if io["port"] == last_port:
                break
            if io["direction"] == 0:
                m.fill_in(b"\xee" * io["size"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return exits


@scenario
def pit_create_rules(k: Any) -> dict[str, Any]:
    """KVM_CREATE_PIT2 reads its config first (EFAULT), then: EEXIST if a PIT exists, ENOENT
    without the in-kernel PIC (vCPUs do not matter, unknown flag bits are ignored). Without a
    PIT the state ioctls are ENXIO, but KVM_GET_PIT, KVM_SET_PIT and KVM_SET_PIT2 copy their
    argument in first (EFAULT for a bad pointer); KVM_GET_PIT2 says ENXIO first."""
    out: dict[str, Any] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        out["before"] = (
            get_pit2(k, vm_fd),
            get_pit(k, vm_fd),
            try_ioctl(k, vm_fd, KVM_SET_PIT2, bytes(kvm_pit_state2())),
            try_ioctl(k, vm_fd, KVM_SET_PIT, bytes(kvm_pit_state())),
        )
        out["null_before"] = tuple(
            try_ioctl(k, vm_fd, cmd, 0)
            for cmd in (KVM_GET_PIT2, KVM_GET_PIT, KVM_SET_PIT2, KVM_SET_PIT, KVM_CREATE_PIT2)
        )
        out["no_irqchip"] = create_pit(k, vm_fd)
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        out["create"] = create_pit(k, vm_fd, 0xFFFFFFFE)
        out["again"] = (create_pit(k, vm_fd), create_pit(k, vm_fd, KVM_PIT_SPEAKER_DUMMY))
        out["null_again"] = try_ioctl(k, vm_fd, KVM_CREATE_PIT2, 0)
        out["get"] = (type(get_pit2(k, vm_fd)).__name__, type(get_pit(k, vm_fd)).__name__)
        vm2 = fds.create_vm(sys_fd)
        fds.create_vcpu(vm2, 0)
        out["vcpu_no_irqchip"] = create_pit(k, vm2)
        vm3 = fds.create_vm(sys_fd)
        k.ioctl(vm3, KVM_CREATE_IRQCHIP, 0)
        fds.create_vcpu(vm3, 0)
        out["vcpu_irqchip"] = create_pit(k, vm3, KVM_PIT_SPEAKER_DUMMY)
    assert out["before"] == ("ENXIO",) * 4
    assert out["null_before"] == ("ENXIO",) + ("EFAULT",) * 4
    assert out["no_irqchip"] == "ENOENT" and out["vcpu_no_irqchip"] == "ENOENT"
    assert out["create"] == 0 and out["again"] == ("EEXIST", "EEXIST")
    assert out["null_again"] == "EFAULT" and out["vcpu_irqchip"] == 0
    return out


@scenario
def pit_reset_state(k: Any) -> dict[str, Any]:
    """After KVM_CREATE_PIT2 every channel is in mode 0xff with access mode 0 and count 65536;
    channels 0 and 1 are gated on, 2 off; channel 0 has never had a timer (count_load_time
    0), channels 1 and 2 started counting at creation; flags and reserved are 0, with or
    without the speaker. KVM_GET_PIT gives the same three channels."""
    out: dict[str, Any] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        for flags in (0, KVM_PIT_SPEAKER_DUMMY):
            vm_fd = fds.create_vm(sys_fd)
            k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
            before = time.monotonic_ns()
            create_pit(k, vm_fd, flags)
            state = pit2(k, vm_fd)
            old = get_pit(k, vm_fd)
            assert not isinstance(old, str), old
            chans = channels(state)
            assert chans == channels(old)
            loaded = [c.pop("count_load_time") for c in chans]
            out[f"flags={flags}"] = {
                "channels": chans,
                "channel0_load_time": loaded[0],
                "others_loaded_at_create": all(t >= before for t in loaded[1:]),
                "flags": state.flags,
                "reserved": tuple(state.reserved),
            }
    reset = {**dict.fromkeys(CHANNEL_FIELDS[:-1], 0), "count": 0x10000, "mode": 0xFF}
    first = out["flags=0"]
    assert first["channels"] == [{**reset, "gate": 1}, {**reset, "gate": 1}, reset]
    assert first["channel0_load_time"] == 0 and first["others_loaded_at_create"]
    assert first["flags"] == 0 and out["flags=1"] == first
    return out


@scenario
def pit_set_then_get(k: Any) -> dict[str, Any]:
    """KVM_SET_PIT2 stores every field as given and the flags with any bits; then each count
    is loaded again: 0 becomes 65536, channels 1 and 2 restart now (their count_load_time is
    replaced), channel 0's count_load_time stays as written. KVM_SET_PIT keeps the flags."""
    state = kvm_pit_state2()
    for i, c in enumerate(state.channels):
        c.count = (0, 0x20000, 1234)[i]
        c.latched_count = 0x1234 + i
        c.count_latched, c.status_latched, c.status = 3, 1, 0x77
        c.read_state, c.write_state, c.write_latch, c.rw_mode = 4, 9, 0xAB, 3
        c.mode = (7, 0xFF, 5)[i]  # no timer: a mode KVM gives none
        c.bcd, c.gate, c.count_load_time = 5, 7, 123456789 + i
    state.flags = 0xFFFFFFF2  # all but HPET_LEGACY
    state.reserved[0] = 9
    old = kvm_pit_state()
    old.channels[0].count, old.channels[0].mode, old.channels[0].count_load_time = 5, 9, 42
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        k.ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0)
        create_pit(k, vm_fd)
        set_at = time.monotonic_ns()
        r = try_ioctl(k, vm_fd, KVM_SET_PIT2, bytes(state))
        got = pit2(k, vm_fd)
        chans = channels(got)
        reloaded = [chans[i].pop("count_load_time") >= set_at for i in (1, 2)]
        r_old = try_ioctl(k, vm_fd, KVM_SET_PIT, bytes(old))
        after_old = pit2(k, vm_fd)
        channel0 = channels(after_old)[0]
    out = {
        "set": (r, r_old),
        "channels": chans,
        "reloaded": reloaded,
        "flags": got.flags,
        "reserved": tuple(got.reserved),
        "after_set_pit": (channel0, after_old.flags),
    }
    assert out["set"] == (0, 0) and reloaded == [True, True]
    assert [c["count"] for c in chans] == [0x10000, 0x20000, 1234]
    assert chans[0]["count_load_time"] == 123456789 and chans[0]["mode"] == 7
    assert out["flags"] == 0xFFFFFFF2 and out["reserved"] == (0,) * 9
    assert channel0["count_load_time"] == 42 and channel0["mode"] == 9
    assert after_old.flags == 0xFFFFFFF2
    return out


PORTS_GUEST = """
    cld
    mov di, 0x2000
    mov al, 0x5a
    in al, 0x43          ; write-only: reads 0
    stosb
    in al, 0x40          ; channel 0 never had a timer: 65536, low byte 0
    stosb
    mov al, 0xc2         ; read-back: count and status of channel 0
    out 0x43, al
    in al, 0x40          ; the status first: mode 0xff << 1, truncated
    stosb
    mov al, 0x34         ; channel 0: lobyte/hibyte, mode 2
    out 0x43, al
    mov al, 0xff         ; count 0xffff
    out 0x40, al
    out 0x40, al
    mov al, 0xe2         ; read-back: status only
    out 0x43, al
    in al, 0x40
    stosb
    mov cx, 8            ; eight samples, each latched
sample:
    mov al, 0x00         ; counter latch, channel 0
    out 0x43, al
    in al, 0x40
    stosb
    in al, 0x40
    stosb
    mov bx, 50
pause:
    dec bx
    jnz pause
    loop sample
    mov ax, 0xffff
    in ax, 0x40          ; live, low byte: one byte, zero-extended
    stosw
    mov eax, 0xffffffff
    in eax, 0x40         ; live, high byte
    stosd
    mov al, 0x14         ; channel 0: lobyte only, mode 2
    out 0x43, al
    mov ax, 0xff80       ; a word write: only the low byte counts
    out 0x40, ax
    out 0x11, al
"""


@scenario
def pit_guest_programs_channel_0(k: Any) -> dict[str, Any]:
    """The guest reads the reset PIT and programs channel 0 through ports 0x40-0x43, none of
    which exit: port 0x43 reads 0, the status byte is (OUT, access, mode, BCD), latched counts
    stay within the count and go down between samples, a word or dword IN gives one byte
    zero-extended, and a word OUT writes its low byte."""
    with chip_machine(k, asm(PORTS_GUEST)) as m:
        create_pit(k, m.vm_fd)
        exits = run_exits(m, 0x11)
        data = m.read(DATA_ADDR, 26)
        state = pit2(k, m.vm_fd)
    chan0 = channels(state)[0]
    samples = [data[4 + 2 * i] | data[5 + 2 * i] << 8 for i in range(8)]
    downs = sum(b < a for a, b in itertools.pairwise(samples))
    out: dict[str, Any] = {
        "exits": exits,
        "reset_reads": (data[0], data[1], data[2]),
        "status_programmed": data[3] & 0x7F,
        "samples_in_range": all(0 < s <= 0xFFFF for s in samples),
        "counting_down": downs >= 5,
        "wide_reads": (data[21], data[23:26].hex()),
        "channel0": {f: chan0[f] for f in ("count", "mode", "rw_mode", "read_state")}
        | {f: chan0[f] for f in ("write_state", "write_latch", "count_load_time", "gate")},
    }
    assert exits == [(0x11, 1, 1)]
    assert out["reset_reads"] == (0, 0, 0xFE) and out["status_programmed"] == 0x34
    assert out["samples_in_range"] and out["counting_down"], samples
    assert out["wide_reads"] == (0, "000000")
    assert out["channel0"]["count"] == 0x80 and out["channel0"]["count_load_time"] == 0
    return out


WIDTHS_GUEST = """
    cld
    mov di, 0x2000
    in ax, 0x43          ; 0x43-0x44 is not inside the PIT's four ports: an exit
    out 0x43, ax
    mov eax, 0x12345678
    in eax, 0x40         ; 0x40-0x43 is
    stosd
    in al, 0x61          ; the speaker port (only with KVM_PIT_SPEAKER_DUMMY)
    stosb
    mov al, 3            ; gate channel 2 on, speaker data on
    out 0x61, al
    in al, 0x61
    stosb
    mov ax, 0xffff
    in ax, 0x61
    stosw
    in al, 0x62          ; inside the speaker's range but refused by it: an exit
    out 0x11, al
"""


@scenario
def pit_port_widths_and_speaker(k: Any) -> dict[str, Any]:
    """KVM answers an access only if it lies wholly inside a device's ports: a word at 0x43
    exits, a dword at 0x40 does not. Port 0x61 is the kernel's only with
    KVM_PIT_SPEAKER_DUMMY: bit 0 gates channel 2, bit 1 is the speaker data (KVM_GET_PIT2's
    flag SPEAKER_DATA_ON); a read adds the refresh clock (bit 4) and channel 2's OUT (bit 5),
    both masked here. 0x62 exits either way."""
    out: dict[str, Any] = {}
    for flags in (0, KVM_PIT_SPEAKER_DUMMY):
        with chip_machine(k, asm(WIDTHS_GUEST)) as m:
            create_pit(k, m.vm_fd, flags)
            exits = run_exits(m, 0x11)
            data = m.read(DATA_ADDR, 8)
            state = pit2(k, m.vm_fd)
        out[f"flags={flags}"] = {
            "exits": exits,
            "dword": data[0:4].hex(),
            "speaker": (data[4] & 0xCF, data[5] & 0xCF, data[6] & 0xCF, data[7]),
            "flags": state.flags,
            "gate2": state.channels[2].gate,
        }
    assert out["flags=1"]["exits"] == [(0x43, 2, 0), (0x43, 2, 1), (0x62, 1, 0), (0x11, 1, 1)]
    assert out["flags=1"]["dword"] == "00000000"
    assert out["flags=1"]["speaker"] == (0, 3, 3, 0)
    assert (out["flags=1"]["flags"], out["flags=0"]["flags"]) == (2, 0)
    assert len(out["flags=0"]["exits"]) == 8 and out["flags=0"]["gate2"] == 0
    return out


def program_channel_0(mode: int, count: int) -> str:
    """Unmask IRQ 0 at the master PIC, then load channel 0 (lobyte/hibyte) in `mode`."""
    return f"""
    mov al, 0xfe
    out 0x21, al
    mov al, {0x30 | mode << 1}
    out 0x43, al
    mov al, {count & 0xFF}
    out 0x40, al
    mov al, {count >> 8}
    out 0x40, al
"""


def irq0_guest(m: Machine, tail: str) -> None:
    """The PIC as pic_programmed_by_guest_takes_irq sets it up (it ends at `out 0x12`), then
    `tail`; IRQ 0 (vector 0x20) goes to the same handler, which reports `out 0x10`."""
    pic_guest(m, assemble(tail, mode="16", base=CODE_ADDR + len(PIC_INIT)).code)
    m.mem[IRQ0_VECTOR * 4 : IRQ0_VECTOR * 4 + 4] = HANDLER.to_bytes(2, "little") + b"\x00\x00"


TICKS = 5


@scenario
def pit_mode_2_interrupts_the_guest(k: Any) -> dict[str, Any]:
    """The guest programs the PIC and channel 0 in mode 2 (about 1 kHz) and halts with IF=1:
    every tick wakes it through IRQ 0; the handler reports (OUT 0x10) and sends EOI. The
    ports never exit; the test counts the first ticks."""
    tail = program_channel_0(2, 1193) + "sti\nidle:\nhlt\njmp idle\n"
    with chip_machine(k) as m:
        irq0_guest(m, tail)
        create_pit(k, m.vm_fd)
        exits = [run_exits(m, 0x12)]
        exits += [run_exits(m, 0x10) for _ in range(TICKS)]
        chan0 = channels(pit2(k, m.vm_fd))[0]
    out = {
        "exits": exits,
        "channel0": (chan0["mode"], chan0["count"], chan0["rw_mode"], chan0["count_load_time"]),
    }
    assert exits == [[(0x12, 1, 1)]] + [[(0x10, 1, 1)]] * TICKS
    assert out["channel0"] == (2, 1193, 3, 0)
    return out


def irr0_within(k: Any, vm_fd: int, seconds: float) -> bool:
    """Whether IRQ 0 is latched in the master PIC's IRR within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while True:
        if pic(k, vm_fd, 0)["irr"] & 1:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


@scenario
def pit_one_shot_modes(k: Any) -> dict[str, Any]:
    """Loading channel 0 in mode 0, 1 or 4 arms a one-shot timer: IRQ 0 is raised once (the
    guest runs with IF=0, so it stays in the PIC's IRR) and, once cleared, not again. Mode 5
    arms no timer in KVM at all."""
    out: dict[str, Any] = {}
    for mode in (0, 1, 4, 5):
        with chip_machine(k) as m:
            irq0_guest(m, program_channel_0(mode, 0x100) + "out 0x13, al\n")
            create_pit(k, m.vm_fd)
            exits = run_exits(m, 0x12) + run_exits(m, 0x13)
            fired = irr0_within(k, m.vm_fd, 0.2 if mode == 5 else 5.0)
            set_pic(k, m.vm_fd, 0, irr=0)
            again = irr0_within(k, m.vm_fd, 0.05)
        out[f"mode{mode}"] = (exits, fired, again)
    one_shot = ([(0x12, 1, 1), (0x13, 1, 1)], True, False)
    assert out == {"mode0": one_shot, "mode1": one_shot, "mode4": one_shot,
                   "mode5": (one_shot[0], False, False)}  # fmt: skip
    return out


COUNTING_HANDLER = """
    inc word ptr [0x3000]
    cmp word ptr [0x3000], 1
    jne eoi
    out 0x10, al                    ; the first tick reports before its EOI
eoi:
    mov al, 0x20
    out 0x20, al
    iret
"""


def ticks_after_a_pause(k: Any, reinject: bool | None) -> dict[str, Any]:
    """50 Hz ticks; the first handler exits before its EOI and the vCPU stays out for 0.4 s
    (about 20 expiries), then runs 0.3 s more. Whether the guest took a burst (the expiries
    of the pause replayed: about 36 ticks) or about the 0.3 s' worth (about 17)."""
    tail = program_channel_0(2, 23864) + "sti\nidle:\nhlt\njmp idle\n"
    with chip_machine(k) as m:
        irq0_guest(m, tail)
        m.write(0x1C00, assemble(COUNTING_HANDLER, mode="16", base=0x1C00).code)
        m.mem[IRQ0_VECTOR * 4 : IRQ0_VECTOR * 4 + 4] = (0x1C00).to_bytes(2, "little") + bytes(2)
        create_pit(k, m.vm_fd)
        control = None
        if reinject is not None:
            arg = bytes(kvm_reinject_control(pit_reinject=int(reinject)))
            control = try_ioctl(k, m.vm_fd, KVM_REINJECT_CONTROL, arg)
        first = run_exits(m, 0x12) + run_exits(m, 0x10)
        time.sleep(0.4)
        last = run_exits(m, 0x99, limit=0.3)
        ticks = int.from_bytes(m.mem[0x3000:0x3002], "little")
    return {"control": control, "exits": first + last, "burst": ticks >= 26}


@scenario
def pit_reinjects_ticks_the_guest_missed(k: Any) -> dict[str, Any]:
    """Reinject mode (the default, and KVM_REINJECT_CONTROL 1): an expiry waits until the
    guest acknowledged the last tick, and the ones that came meanwhile are replayed one after
    another once it does: a burst of ~20 ticks. With KVM_REINJECT_CONTROL 0 they are lost.
    KVM_REINJECT_CONTROL is ENXIO without a PIT; KVM_CREATE_PIT (the older ioctl) makes one
    with the speaker port."""
    out: dict[str, Any] = {
        label: ticks_after_a_pause(k, reinject)
        for label, reinject in (("default", None), ("reinject=1", True), ("reinject=0", False))
    }
    with chip_machine(k) as m:
        off = bytes(kvm_reinject_control())
        out["control_without_pit"] = try_ioctl(k, m.vm_fd, KVM_REINJECT_CONTROL, off)
        out["create_pit"] = try_ioctl(k, m.vm_fd, KVM_CREATE_PIT, 0)
        out["create_pit2_after"] = create_pit(k, m.vm_fd)
    assert out["default"]["burst"] and out["reinject=1"]["burst"], out
    assert not out["reinject=0"]["burst"], out
    assert out["control_without_pit"] == "ENXIO" and out["create_pit2_after"] == "EEXIST"
    return out
