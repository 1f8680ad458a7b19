"""Every registered scenario, by name: importing this module imports all scenario modules."""

from __future__ import annotations

from . import (  # noqa: F401 (imported for their @scenario registrations)
    scenarios_code,
    scenarios_cpuid,
    scenarios_debug,
    scenarios_dirty,
    scenarios_eventfd,
    scenarios_events,
    scenarios_exits,
    scenarios_faults,
    scenarios_guests,
    scenarios_ioctl,
    scenarios_irq,
    scenarios_irqchip,
    scenarios_lapic,
    scenarios_memslot,
    scenarios_mmio,
    scenarios_more,
    scenarios_msr,
    scenarios_pit,
    scenarios_process,
    scenarios_vcpu_state,
)
from .registry import SCENARIOS, Scenario

__all__ = ["SCENARIOS", "Scenario"]
