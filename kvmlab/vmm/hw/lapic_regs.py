"""The local APIC's register page at 0xfee00000, for a VM without an in-kernel irqchip.

Without KVM_CREATE_IRQCHIP, KVM has no APIC: the guest's accesses to this page reach the VMM
as MMIO exits. Kernels probe the page early (the ID at 0x20, the version at 0x30) before they
decide how to take interrupts; this model answers those as QEMU's APIC does (version 0x14,
six LVT entries), keeps what the guest writes per vCPU, reads it back, and logs it. It
delivers no interrupts: no timer, no IPIs, EOI does nothing.
https://gitlab.com/qemu-project/qemu/-/blob/master/hw/intc/apic.c
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvmlab.vmm.memory import MmioDevice

log = logging.getLogger("kvmlab.vmm")
APIC_DEFAULT_ADDRESS = 0xFEE00000
APIC_SPACE_SIZE = 0x1000
APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TASKPRI = 0x80
APIC_DFR = 0xE0
APIC_SPIV = 0xF0
APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR = (
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370
)  # fmt: skip
APIC_VERSION = 0x14  # an integrated APIC, as QEMU's
APIC_LVT_NB = 6
APIC_LVT_MASKED = 1 << 16
# Registers with a power-on value other than zero (Intel SDM vol. 3, 11.4.7.1)
RESET_VALUES = {APIC_DFR: 0xFFFFFFFF, APIC_SPIV: 0xFF} | {
    lvt: APIC_LVT_MASKED
    for lvt in (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)
}


class LocalApicRegisters(MmioDevice):
    """One 4 KiB page of 32-bit registers every 16 bytes; each vCPU sees its own.

    `current_cpu()` says which vCPU is accessing the page (its index is its APIC ID).
    `writes` records (cpu, register, value) for every write.
    """

    name = "lapic"

    def __init__(self, current_cpu: Callable[[], int]) -> None:
        self.current_cpu = current_cpu
        self.regs: dict[int, dict[int, int]] = {}
        self.writes: list[tuple[int, int, int]] = []

    def _register(self, cpu: int, reg: int) -> int:
        if reg == APIC_ID:
            return cpu << 24
        if reg == APIC_LVR:
            return APIC_VERSION | (APIC_LVT_NB - 1) << 16
        return self.regs.get(cpu, {}).get(reg, RESET_VALUES.get(reg, 0))

    def read(self, offset: int, size: int) -> int:
        """Registers are 32 bits at 16-byte steps; a narrower read takes its bytes."""
        reg, within = offset & ~0xF, offset & 0xF
        if within >= 4:
            return 0
        value = self._register(self.current_cpu(), reg)
        return (value >> (8 * within)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        cpu = self.current_cpu()
        reg = offset & ~0xF
        self.writes.append((cpu, reg, value))
        log.debug("lapic: vCPU %d wrote %#x to register %#x", cpu, value, reg)
        if reg not in (APIC_ID, APIC_LVR) and offset & 0xF == 0:
            self.regs.setdefault(cpu, {})[reg] = value & 0xFFFFFFFF

    def reset(self) -> None:
        self.regs.clear()
        self.writes.clear()
