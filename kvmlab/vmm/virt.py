"""An arm64 board like QEMU's `virt`: RAM at 0x40000000, a PL011 at 0x09000000, PSCI.

The vCPUs are created as QEMU's virt creates them under KVM: the target from
KVM_ARM_PREFERRED_TARGET, PSCI 0.2, and every CPU but the first powered off, waiting for
the boot CPU's PSCI CPU_ON. `boot()` loads a flat binary and points the boot CPU's pc at it
with KVM_SET_ONE_REG. A guest ends with PSCI SYSTEM_OFF (the machine stops in "shutdown")
or SYSTEM_RESET (the machine resets and runs on); both reach the VMM as
KVM_EXIT_SYSTEM_EVENT.
https://gitlab.com/qemu-project/qemu/-/blob/v9.1.0/hw/arm/virt.c
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Self

from kvmlab.uapi.arm64 import REG_PC
from kvmlab.vmm.arm import (
    ARMCPU,
    arm_cpu,
    kvm_arch_get_registers,
    kvm_arm_preferred_target,
    kvm_arm_reset_vcpu,
)
from kvmlab.vmm.cpu import CPUState
from kvmlab.vmm.hw.pl011 import PL011, PL011_MMIO_SIZE
from kvmlab.vmm.kvm_all import KVMState, kvm_cpu_synchronize_post_reset, kvm_init_vcpu
from kvmlab.vmm.machine import MachineState

VIRT_MEM = 0x40000000  # base_memmap[VIRT_MEM]
VIRT_UART = 0x09000000  # base_memmap[VIRT_UART]
VIRT_RAM_SIZE = 0x200000  # 2 MiB (QEMU's default is 128 MiB; kvmlab's guests are small)


class Virt(MachineState):
    """QEMU's `virt` on the syscall face `k` (default: `kvmlab.sys_arm64`).

    `cpus` vCPUs (the first runs, the others wait for CPU_ON), `ram_size` bytes of RAM at
    0x40000000 and the PL011 at 0x09000000 (`serial`). Runs like the PC's Machine: `run()`
    and `step()` on this thread (vCPU 0 only), or `start()`/`wait()` with a thread per vCPU.
    """

    ram_base = VIRT_MEM

    def __init__(
        self,
        k: ModuleType | None = None,
        *,
        ram_size: int = VIRT_RAM_SIZE,
        cpus: int = 1,
        log_limit: int = 100_000,
    ) -> None:
        if k is None:
            k = importlib.import_module("kvmlab.sys_arm64")
        self.entry = VIRT_MEM  # where the boot CPU starts, after boot() and every reset
        self._kvm_target: int | None = None
        super().__init__(k, ram_size=ram_size, cpus=cpus, log_limit=log_limit)
        self.serial = self.mmio.register(VIRT_UART, PL011_MMIO_SIZE, PL011(lock=self.bql))

    def cpu_init(self, kvm: KVMState, index: int) -> CPUState:
        """KVM_CREATE_VCPU and KVM_ARM_VCPU_INIT; secondaries start powered off."""
        if self._kvm_target is None:
            self._kvm_target = kvm_arm_preferred_target(kvm.k, kvm.vmfd)
        return kvm_init_vcpu(
            kvm, index, self, ARMCPU, kvm_target=self._kvm_target, start_powered_off=index > 0
        )

    def cpu_reset(self, cpu: CPUState) -> None:
        """KVM_ARM_VCPU_INIT again; the boot CPU goes back to the entry point."""
        kvm_arm_reset_vcpu(cpu)
        if cpu.cpu_index == 0:
            arm_cpu(cpu).core[REG_PC] = self.entry
            cpu.vcpu_dirty = True

    def boot(self, code: bytes, entry: int = VIRT_MEM) -> Self:
        """Load a flat binary at `entry` and start the boot CPU there (the loader's job)."""
        with self.bql:
            if self._threads and self.state == "running":
                raise RuntimeError("pause() the machine before changing a vCPU")
            self.load(code, entry)
            self.entry = entry
            cpu = self.cpus[0]
            kvm_arch_get_registers(cpu)  # cpu_synchronize_state
            arm_cpu(cpu).core[REG_PC] = entry
            kvm_cpu_synchronize_post_reset(cpu)
        return self
