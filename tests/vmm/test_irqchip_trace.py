"""What the call-path trace shows of the in-kernel irqchip, for the sample guests run with
irqchip="kernel" on the simulator: the paths a student follows in lapic.c, i8254.c, irq.c."""

from __future__ import annotations

import collections

from kvmlab import sys as k
from kvmlab.guests import SAMPLES
from kvmlab.kernel import trace


def calls_while(sample: str, **machine: int | str) -> collections.Counter[str]:
    guest = SAMPLES[sample]
    with trace.recording() as rec, guest.machine(k, irqchip="kernel", **machine) as m:
        assert guest.run(m)
    return collections.Counter(rec.calls())


def test_the_timer_guest_sleeps_in_kvm_and_its_ticks_come_from_the_kernel_pit() -> None:
    calls = calls_while("timer")
    for path in ("kvm_create_pit", "pit_ioport_write", "pit_timer_fn", "pit_do_work"):
        assert calls[path], path
    assert calls["kvm_set_irq"] >= 20  # ten ticks, each raised and lowered
    assert calls["kvm_vcpu_halt"] >= 1 and calls["kvm_cpu_get_interrupt"] >= 10
    assert calls["kvm_emulate_halt"] >= 1 and calls["kvm_vcpu_block"] >= 1  # HLT sleeps in KVM


def test_smp_start_up_goes_through_the_icr_init_and_sipi() -> None:
    calls = calls_while("smp-sipi", cpus=4)
    assert calls["kvm_lapic_reg_write"] >= 3  # SPIV, ICR2 and the ICR at least
    assert calls["kvm_apic_send_ipi"] >= 6  # INIT and SIPI for each of three APs
    assert calls["__apic_accept_irq"] >= 6
    assert calls["kvm_apic_accept_events"] >= 3
