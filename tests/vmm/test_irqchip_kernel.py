"""The PC with its interrupt controllers in KVM (`Machine(irqchip="kernel")`) against the same
guests with them in the VMM, on the simulator and on the host's /dev/kvm.

With the irqchip in the kernel the PIC, PIT and IOAPIC ports never exit, devices raise lines
with KVM_IRQ_LINE instead of KVM_INTERRUPT, HLT sleeps in KVM, and the application processors
wait for INIT and SIPI. Every test takes the `k` fixture (the host half skips without
/dev/kvm). A syscall face that counts ioctls shows which calls the VMM made.
"""

from __future__ import annotations

import collections
import threading
import time
from types import ModuleType
from typing import Any

import pytest
from polling import wait_until

from kvmlab.guests import GUEST_BASE, SAMPLES
from kvmlab.uapi import (
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_INTERRUPT,
    KVM_IRQ_LINE,
    KVM_IRQ_LINE_STATUS,
    KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED,
)
from kvmlab.vmm import EXCP_HLT, Machine
from kvmlab.vmm.hw.i8254 import I8254
from kvmlab.vmm.hw.kvm import KVMPic, KVMPit
from kvmlab.vmm.i386 import kvm_get_apic, kvm_get_mp_state, kvm_put_apic

PIC_PORTS = {0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1}
PIT_PORTS = {0x40, 0x41, 0x42, 0x43}
TIMER = SAMPLES["timer"]
SMP_SIPI = SAMPLES["smp-sipi"]


class CountingFace:
    """A syscall face that passes every call to `k` and counts the ioctl numbers it saw."""

    def __init__(self, k: ModuleType) -> None:
        self.k = k
        self.name = k.name
        self.ioctls: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def open(self, *args: Any) -> Any:
        return self.k.open(*args)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> Any:
        with self._lock:
            self.ioctls[request] += 1
        return self.k.ioctl(fd, request, arg)

    def mmap(self, *args: Any) -> Any:
        return self.k.mmap(*args)

    def close(self, fd: int) -> None:
        self.k.close(fd)


def assemble16(source: str) -> bytes:
    pytest.importorskip("keystone")
    from kvmlab.asm import assemble

    return assemble(source, mode="16", base=GUEST_BASE).code


def io_ports(m: Machine) -> set[int]:
    return {r.address for r in m.exit_log if r.reason == "IO" and r.address is not None}


# --- the timer guest, both ways ------------------------------------------------------------------


@pytest.mark.parametrize("irqchip", ["user", "kernel"])
def test_the_timer_guest_takes_its_ten_ticks_either_way(k: ModuleType, irqchip: str) -> None:
    face = CountingFace(k)
    with TIMER.machine(face, irqchip=irqchip) as m:
        assert TIMER.run(m)
        assert m.serial.text() == "..........\n10 ticks\n"
        assert m.post.codes == [ord(".")] * 10  # the handler ran once per tick
        reasons = collections.Counter(m.exit_log.reasons())
        if irqchip == "user":
            # the waits for a tick came to the VMM (a tick already pending when the guest
            # reaches HLT is injected without one, so not always ten)
            assert reasons["HLT"] > 0
            assert io_ports(m) & PIC_PORTS and io_ports(m) & PIT_PORTS
            assert face.ioctls[KVM_INTERRUPT] >= 10 and not face.ioctls[KVM_CREATE_IRQCHIP]
            assert isinstance(m.pit, I8254) and m.pit.irqs >= 10  # QEMU's model raised them
        else:
            assert "HLT" not in reasons and "IRQ_WINDOW_OPEN" not in reasons
            assert io_ports(m) == {0x80, 0x3F8}  # only the guest's own devices
            assert face.ioctls[KVM_CREATE_IRQCHIP] == face.ioctls[KVM_CREATE_PIT2] == 1
            assert not face.ioctls[KVM_INTERRUPT]
            assert isinstance(m.pic, KVMPic)
            master = m.pic.master.kvm_pic_get()  # the guest programmed KVM's PIC
            assert (master.irq_base, master.imr) == (0x20, 0xFF)  # base 0x20, all masked
            assert isinstance(m.pit, KVMPit)
            m.pit.kvm_pit_get()  # and KVM's PIT: channel 0, rate generator, 100 Hz
            assert (m.pit.channels[0].mode, m.pit.channels[0].count) == (2, 11932)
        assert m.cpus[0].halted


def test_a_kernel_irqchip_machine_resets_its_chips_and_runs_the_guest_again(
    k: ModuleType,
) -> None:
    with TIMER.machine(k, irqchip="kernel") as m:
        assert TIMER.run(m)
        m.reset()
        assert isinstance(m.pic, KVMPic) and isinstance(m.pit, KVMPit)
        master = m.pic.master.kvm_pic_get()
        assert (master.irq_base, master.imr) == (0, 0)  # as KVM_CREATE_IRQCHIP made it
        m.pit.kvm_pit_get()
        assert m.pit.channels[0].mode not in range(6)  # not counting: KVM's fresh PIT
        m.serial.output.clear()
        assert TIMER.run(m)
        assert m.serial.text() == "..........\n10 ticks\n"


def test_reset_after_setup_cpu_gives_back_the_local_apic_kvm_made(k: ModuleType) -> None:
    """setup_cpu moves where reset() returns, not the APIC: a page the guest programmed
    before it (here SPIV software-enabled, as by KVM_SET_LAPIC) is not what reset restores."""
    with Machine(k, irqchip="kernel") as m:
        cpu = m.cpus[0]
        page = bytearray(kvm_get_apic(cpu))
        page[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")
        kvm_put_apic(cpu, bytes(page))
        m.setup_cpu(0, "real", GUEST_BASE)
        m.reset()
        assert int.from_bytes(kvm_get_apic(cpu)[0xF0:0xF4], "little") == 0xFF


# --- a device's line: the UART's IRQ 4 through KVM_IRQ_LINE ------------------------------------

SERIAL_IRQ_GUEST = """
    cli
    mov word ptr [0x24 * 4], com1        ; IVT[0x24] = 0000:com1 (IRQ 4 on the master)
    mov word ptr [0x24 * 4 + 2], 0
    mov al, 0x11                         ; ICW1-4: master at vectors 0x20-0x27
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xef                         ; only IRQ 4 unmasked
    out 0x21, al
    mov dx, 0x3f9
    mov al, 0x01                         ; UART IER: interrupt on received data
    out dx, al
    sti
idle:
    hlt
    cmp byte ptr [done], 0
    je idle
    cli
    hlt
com1:
    push ax
    push dx
    mov al, 0x24
    out 0x80, al                         ; one POST code per interrupt taken
drain:
    mov dx, 0x3fd                        ; LSR: data ready?
    in al, dx
    test al, 1
    jz eoi
    mov dx, 0x3f8
    in al, dx                            ; RBR
    out dx, al                           ; echo it
    cmp al, '.'
    jne drain
    mov byte ptr [done], 1
    jmp drain
eoi:
    mov al, 0x20
    out 0x20, al
    pop dx
    pop ax
    iret
done:
    .byte 0
"""


def test_the_uart_raises_irq_4_with_kvm_irq_line_and_the_halted_vcpu_wakes_in_kvm(
    k: ModuleType,
) -> None:
    face = CountingFace(k)
    with Machine(face, irqchip="kernel") as m:
        m.boot(assemble16(SERIAL_IRQ_GUEST), "real", GUEST_BASE)
        m.start()
        try:
            for n, byte in enumerate(b"kvm.", start=1):
                m.serial.feed(bytes([byte]))  # on this thread, the vCPU asleep in KVM_RUN
                assert wait_until(lambda n=n: len(m.serial.output) == n, 10.0), m.serial.text()
            assert m.wait(10)
        finally:
            m.stop()
        assert m.serial.text() == "kvm."
        assert m.post.codes == [0x24] * 4  # one interrupt per byte typed
        lines = face.ioctls[KVM_IRQ_LINE] + face.ioctls[KVM_IRQ_LINE_STATUS]
        assert lines >= 8  # the line rose and fell for each byte
        assert not face.ioctls[KVM_INTERRUPT]
        assert isinstance(m.pic, KVMPic) and m.pic.irqs == 4
        assert "HLT" not in m.exit_log.reasons()
        assert all(c.halted and not c.if_flag for c in m.cpus)


# --- SMP: application processors started by INIT and SIPI --------------------------------------


@pytest.mark.parametrize("cpus", [2, 4])
def test_the_bsp_starts_every_ap_with_init_and_sipi(k: ModuleType, cpus: int) -> None:
    with SMP_SIPI.machine(k, cpus=cpus) as m:
        for cpu in m.cpus:
            kvm_get_mp_state(cpu)
        waiting = [cpu.mp_state for cpu in m.cpus]
        assert waiting == [KVM_MP_STATE_RUNNABLE] + [KVM_MP_STATE_UNINITIALIZED] * (cpus - 1)
        assert SMP_SIPI.run(m)
        aps = "".join(f"AP {n}: woke in real mode at 0100:0000\n" for n in range(1, cpus))
        assert m.serial.text() == (
            f"BSP: {cpus} vCPUs; INIT and SIPI (vector 0x01) to each AP\n"
            f"{aps}BSP: {cpus - 1} APs checked in\n"
        )
        assert {r.cpu for r in m.exit_log if r.reason == "IO"} == set(range(cpus))
        assert "HLT" not in m.exit_log.reasons()
        assert all(c.halted for c in m.cpus)


def test_the_sipi_sample_is_refused_without_a_kernel_irqchip() -> None:
    with pytest.raises(ValueError, match=r"INIT and SIPI.*irqchip='kernel'"):
        SMP_SIPI.machine(irqchip="user")


def test_the_two_vcpu_handshake_runs_with_its_aps_made_runnable_by_the_vmm(
    k: ModuleType,
) -> None:
    smp = SAMPLES["smp"]
    with smp.machine(k, irqchip="kernel") as m:
        assert smp.run(m)
        assert m.serial.text().endswith("first vCPU: pong seen, handshake done\n")
        assert "HLT" not in m.exit_log.reasons()


# --- port 0x61 stays in userspace, over KVM's PIT ------------------------------------------------

SPEAKER_GUEST = """
    mov al, 0xb0                         ; PIT: channel 2, lobyte/hibyte, mode 0
    out 0x43, al
    mov al, 0xa9                         ; count 1193: one millisecond
    out 0x42, al
    mov al, 0x04
    out 0x42, al
    mov al, 0x01                         ; port 0x61: channel 2's gate up
    out 0x61, al
poll:
    in al, 0x61                          ; bit 5: channel 2's OUT
    test al, 0x20
    jz poll
    hlt
"""


def test_port_0x61_reads_channel_2_of_the_pit_in_kvm(k: ModuleType) -> None:
    with Machine(k, irqchip="kernel") as m:
        m.boot(assemble16(SPEAKER_GUEST), "real", GUEST_BASE)
        assert m.run(max_exits=1_000_000) == EXCP_HLT
        assert io_ports(m) == {0x61}  # the PIT's ports never exited, port 0x61 always did
        reads = [r.data[0] for r in m.exit_log if r.address == 0x61 and r.direction == "in"]
        assert reads[-1] & 0x21 == 0x21  # gate up, OUT high at the terminal count
        assert all(not value & 0x20 for value in reads[:-1])
        assert isinstance(m.pit, KVMPit)
        m.pit.kvm_pit_get()
        assert m.pit.channels[2].gate and m.pit.channels[2].count == 1193


def test_an_unknown_irqchip_is_refused() -> None:
    with pytest.raises(ValueError, match="'user' or 'kernel'"):
        Machine(irqchip="split")


def test_a_vcpu_asleep_with_interrupts_on_ends_a_run_after_the_idle_limit(k: ModuleType) -> None:
    with Machine(k, irqchip="kernel") as m:
        m.boot(bytes([0xFB, 0xF4, 0xEB, 0xFD]), "real", GUEST_BASE)  # sti / l: hlt / jmp l
        start = time.monotonic()
        assert m.run() == EXCP_HLT
        assert 1.0 <= time.monotonic() - start < 10  # nothing in KVM woke it for a second
        assert m.cpus[0].halted and m.cpus[0].if_flag
        assert set(m.exit_log.reasons()) == {"INTR"}  # the looks; never an HLT exit
