"""The arm64 VMM: the PL011, the virt board's run loop, and the arm64 sample guests."""

from __future__ import annotations

import pytest

from kvmlab import sys_arm64 as k
from kvmlab.guests import ARM64_SAMPLES
from kvmlab.uapi import KVM_GET_MP_STATE, KVM_MP_STATE_STOPPED, kvm_mp_state
from kvmlab.uapi.arm64 import REG_PC
from kvmlab.vmm.arm import cpu_dump_state, cpu_get_pc, kvm_get_one_reg
from kvmlab.vmm.hw.pl011 import (
    INT_RX,
    INT_TX,
    LCR_FEN,
    PL011,
    PL011_FLAG_RXFE,
    PL011_FLAG_RXFF,
    PL011_FLAG_TXFE,
    UARTDR,
    UARTFR,
    UARTICR,
    UARTIMSC,
    UARTLCR_H,
    UARTMIS,
    UARTRIS,
)
from kvmlab.vmm.virt import VIRT_MEM, Virt

EXPECTED = {
    "hello": "Hello from arm64!\n",
    "psci": "PSCI 1.1, powering off\n",
    "smp": "second vCPU: ping seen, pong sent\nfirst vCPU: pong seen, handshake done\n",
}


OFF = "ldr x0, =0x84000008\nhvc #0\n"  # PSCI SYSTEM_OFF


def assemble(source: str) -> bytes:
    pytest.importorskip("keystone")
    from kvmlab.asm import assemble

    return assemble(source, arch="arm64", base=VIRT_MEM).code


# --- the PL011 on its own ---------------------------------------------------------------------


def test_pl011_transmits_at_once_and_raises_tx_when_unmasked() -> None:
    levels: list[bool] = []
    uart = PL011(on_irq=levels.append)
    assert uart.read(UARTFR, 4) == PL011_FLAG_TXFE | PL011_FLAG_RXFE  # 0x90 after reset
    uart.write(UARTDR, 4, ord("A"))
    assert (uart.text(), uart.read(UARTRIS, 4) & INT_TX, levels) == ("A", INT_TX, [])
    uart.write(UARTIMSC, 4, INT_TX)
    assert uart.read(UARTMIS, 4) == INT_TX and levels == [True]
    uart.write(UARTICR, 4, INT_TX)
    assert uart.read(UARTRIS, 4) & INT_TX == 0 and levels == [True, False]


def test_pl011_receive_fifo_holds_one_byte_without_fen_and_sixteen_with_it() -> None:
    uart = PL011()
    uart.feed(b"abc")
    assert uart.read(UARTFR, 4) & (PL011_FLAG_RXFE | PL011_FLAG_RXFF) == PL011_FLAG_RXFF
    assert uart.read(UARTRIS, 4) & INT_RX
    assert bytes(uart.read(UARTDR, 4) for _ in range(3)) == b"abc"  # refilled as it is read
    assert uart.read(UARTFR, 4) & PL011_FLAG_RXFE and not uart.read(UARTRIS, 4) & INT_RX
    uart.write(UARTLCR_H, 4, LCR_FEN)
    uart.feed(bytes(20))
    assert len(uart.fifo) == 16 and len(uart.rx) == 4
    assert uart.read(UARTFR, 4) & PL011_FLAG_RXFF


def test_pl011_primecell_id_is_what_the_amba_bus_reads() -> None:
    uart = PL011()
    ids = [uart.read(0xFE0 + 4 * i, 4) for i in range(8)]
    assert ids == [0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1]
    uart.write(0xFE0, 4, 0xFF)  # read-only
    assert uart.read(0xFE0, 4) == 0x11


# --- the samples --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARM64_SAMPLES))
def test_an_arm64_sample_prints_its_output_and_powers_off(name: str) -> None:
    guest = ARM64_SAMPLES[name]
    with guest.machine() as m:
        assert guest.run(m), f"{name} did not finish"
        assert (m.serial.text(), m.state, m.exit_code) == (EXPECTED[name], "shutdown", 0)
        assert [c.last_error for c in m.cpus] == [""] * guest.cpus
        assert "SYSTEM_EVENT" in m.exit_log.reasons()
        assert "HLT" not in m.exit_log.reasons()  # arm64 has no HLT exit


def test_the_smp_sample_runs_the_second_vcpu_on_its_own_thread_after_cpu_on() -> None:
    guest = ARM64_SAMPLES["smp"]
    with guest.machine() as m:
        mp = kvm_mp_state()
        k.ioctl(m.cpus[1].kvm_fd, KVM_GET_MP_STATE, mp)
        assert mp.mp_state == KVM_MP_STATE_STOPPED  # POWER_OFF: waits for CPU_ON
        assert guest.run(m)
        by_cpu = {r.cpu for r in m.exit_log if r.reason == "MMIO"}
        assert by_cpu == {0, 1}
        second = [r for r in m.exit_log if r.cpu == 1 and r.reason == "MMIO"]
        assert second[0].rip is not None and second[0].rip > VIRT_MEM


@pytest.mark.parametrize("name", sorted(ARM64_SAMPLES))
def test_the_shipped_arm64_bytes_are_the_assembled_source(name: str) -> None:
    guest = ARM64_SAMPLES[name]
    assert assemble(guest.source) == guest.code, "run `python -m kvmlab.guests` to rebuild bin/"


# --- the board ---------------------------------------------------------------------------------


def test_boot_sets_pc_with_one_reg_and_mmio_exits_carry_it() -> None:
    code = assemble("ldr x1, =0x09000000\nmov w2, #0x4b\nstrb w2, [x1]\n" + OFF)
    with Virt() as m:
        m.boot(code, VIRT_MEM + 0x100)
        assert not m.cpus[0].vcpu_dirty  # already in KVM: KVM_SET_ONE_REG at boot
        record = m.step()
        assert record is not None
        assert (record.reason, record.address, record.direction, record.data) == (
            "MMIO",
            0x09000000,
            "write",
            b"K",
        )
        assert record.rip == VIRT_MEM + 0x108 == cpu_get_pc(m.cpus[0])
        m.run()
        assert (m.serial.text(), m.state) == ("K", "shutdown")


def test_a_guest_reads_typed_input_through_mmio_loads_completed_on_reentry() -> None:
    code = assemble(
        "ldr x1, =0x09000000\n"
        "loop:\nldr w5, [x1, #0x18]\ntbnz w5, #4, loop\n"  # RXFE: nothing typed yet
        "ldr w4, [x1]\nstrb w4, [x1]\ncmp w4, #0x2e\nb.ne loop\n"  # echo until '.'
        "ldr x0, =0x84000008\nhvc #0"
    )
    with Virt() as m:
        m.boot(code)
        m.serial.feed(b"arm.")
        m.run()
        assert m.serial.text() == "arm."
        reads = [r for r in m.exit_log if r.direction == "read" and r.address == 0x09000000]
        assert [r.data[0] for r in reads] == list(b"arm.")


def test_psci_system_reset_resets_the_machine_which_runs_on() -> None:
    code = assemble(
        "ldr x1, =0x09000000\nmov w2, #0x2a\nstrb w2, [x1]\n"
        "ldr x3, =0x40100000\nldr w4, [x3]\nadd w4, w4, #1\nstr w4, [x3]\n"  # RAM, not an image
        "cmp w4, #2\nb.eq off\nldr x0, =0x84000009\nhvc #0\n"  # SYSTEM_RESET
        "off:\nldr x0, =0x84000008\nhvc #0"
    )
    with Virt() as m:
        m.boot(code)
        m.run()
        assert (m.serial.text(), m.resets, m.state) == ("**", 1, "shutdown")
        assert m.exit_log.reasons().count("SYSTEM_EVENT") == 2


def test_a_run_failure_stops_the_machine_with_the_arm64_registers() -> None:
    code = assemble("ldr x1, =0x09000000\nldp x2, x3, [x1]")  # no syndrome: KVM cannot emulate
    with Virt() as m:
        m.boot(code)
        m.run()
        cpu = m.cpus[0]
        assert m.state == "internal-error"
        assert "Function not implemented" in cpu.last_error  # ENOSYS
        dump = cpu_dump_state(cpu)
        assert f"PC={VIRT_MEM + 4:016x}" in dump and "X01=0000000009000000" in dump
        assert "Code=" + code[4:8].hex(" ") in dump
        assert kvm_get_one_reg(cpu, REG_PC) == VIRT_MEM + 4
