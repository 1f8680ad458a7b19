"""The sample guests: each runs to its output on both backends, with the same exits."""

from __future__ import annotations

from types import ModuleType

import pytest
from conftest import load_backend

from kvmlab.guests import GUEST_BASE, SAMPLES, SampleGuest
from kvmlab.vmm import ScratchDevice

EXPECTED = {
    "hello-real": "Hello from real mode!\n",
    "hello-protected": "Hello from protected mode!\n",
    "hello-long": "Hello from long mode!\n",
    "echo": "kvm.",
    "timer": "..........\n10 ticks\n",
    "mmio": "MMIO device answered\n",
    "smp": "second vCPU: ping seen, pong sent\nfirst vCPU: pong seen, handshake done\n",
    "smp-sipi": "BSP: 2 vCPUs; INIT and SIPI (vector 0x01) to each AP\n"
    "AP 1: woke in real mode at 0100:0000\nBSP: 1 APs checked in\n",
}
TIMED = {"timer", "smp", "smp-sipi"}  # exits depend on when ticks land and threads interleave


def run_sample(guest: SampleGuest, k: ModuleType) -> tuple[str, list[str], str]:
    with guest.machine(k) as m:
        assert guest.run(m), f"{guest.name} did not finish"
        return m.serial.text(), m.exit_log.reasons(), m.cpus[0].last_error


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_sample_prints_its_output_on_the_simulator(name: str) -> None:
    guest = SAMPLES[name]
    text, reasons, error = run_sample(guest, load_backend("sim"))
    assert (text, error) == (EXPECTED[name], "")
    # with the irqchip in the kernel HLT never exits: the last exit is the VMM's look (a kick)
    assert reasons[-1] in (("INTR",) if guest.irqchip == "kernel" else ("HLT", "IO"))


@pytest.mark.host
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_sample_behaves_the_same_on_the_host(name: str) -> None:
    guest = SAMPLES[name]
    host_text, host_reasons, _ = run_sample(guest, load_backend("host"))
    sim_text, sim_reasons, _ = run_sample(guest, load_backend("sim"))
    assert sim_text == host_text == EXPECTED[name]
    if name not in TIMED:
        assert sim_reasons == host_reasons


def test_the_timer_sample_takes_its_interrupts_through_the_pic_and_the_pit() -> None:
    guest = SAMPLES["timer"]
    with guest.machine() as m:
        guest.run(m)
        assert m.pit.irqs >= 10
        assert m.post.codes[-10:] == [ord(".")] * 10
        assert m.pic.master.irq_base == 0x20 and m.pic.master.imr == 0xFF  # masked at 10
        assert "IRQ_WINDOW_OPEN" in m.exit_log.reasons() or m.pit.irqs == 10


def test_the_mmio_sample_reads_modifies_and_writes_the_device() -> None:
    guest = SAMPLES["mmio"]
    with guest.machine() as m:
        guest.run(m)
        scratch = m.mmio.devices()[0]
        assert isinstance(scratch, ScratchDevice)
        kinds = [(kind, offset) for kind, offset, _, _ in scratch.accesses]
        assert kinds[:4] == [("write", 0), ("read", 0), ("read", 4), ("write", 4)]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_shipped_bytes_are_the_assembled_source(name: str) -> None:
    pytest.importorskip("keystone")
    from kvmlab.asm import assemble

    guest = SAMPLES[name]
    program = assemble(guest.source, mode=guest.asm_mode, base=GUEST_BASE)
    assert program.code == guest.code, "run `python -m kvmlab.guests` to rebuild bin/"
