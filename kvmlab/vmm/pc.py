"""A PC for `-kernel`: kvmlab's Machine with the devices kernels built for QEMU probe, and a
multiboot kernel loaded and ready to run on vCPU 0.

Besides the Machine's own COM1, isa-debug-exit at 0x501 and debug console, the PC has
isa-debug-exit where test suites put it (`-device isa-debug-exit,iobase=0xf4,iosize=4`),
fw_cfg at 0x510 (signature, ID, RAM size, CPU counts, the file "etc/e820") and the local
APIC's register page at 0xfee00000 (KVM's own APIC with `irqchip="kernel"`). Every vCPU is an
X86CPU of a CPU model (vmm.cpu_model; with `cpu_model=None`, none: every CPUID leaf then reads
zero). vCPU 0 starts in 32-bit protected mode at the last steps of QEMU's multiboot ROM,
placed in the BIOS area; the others wait, as application processors wait for a startup IPI
(with the irqchip in the kernel, the kernel's BSP may send one).
"""

from __future__ import annotations

import logging
import struct
import threading
from types import ModuleType

from kvmlab.vmm.cpu import CPUState
from kvmlab.vmm.cpu_model import (
    KVMLAB64,
    FeatureWord,
    X86CPUDefinition,
    kvm_arch_get_supported_cpuid,
    x86_cpu_filter_features,
)
from kvmlab.vmm.hw.debugexit import DebugExit
from kvmlab.vmm.hw.fw_cfg import (
    FW_CFG_IO_BASE,
    FW_CFG_IO_SIZE,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_RAM_SIZE,
    FwCfgIo,
)
from kvmlab.vmm.hw.lapic_regs import APIC_DEFAULT_ADDRESS, APIC_SPACE_SIZE, LocalApicRegisters
from kvmlab.vmm.i386 import X86CPU
from kvmlab.vmm.kvm_all import KVMState, kvm_init_vcpu
from kvmlab.vmm.machine import Machine
from kvmlab.vmm.multiboot import BIOS_AREA, E820_RAM, boot_stub, load_multiboot, parse_kernel

log = logging.getLogger("kvmlab.vmm")
PC_RAM_SIZE = 128 << 20  # QEMU's default -m
PC_MIN_RAM_SIZE = 2 << 20  # the low MiB and room for a kernel above it
PC_MAX_RAM_SIZE = 3 << 30  # one block of RAM below the PCI hole and the APIC page
ISA_DEBUG_EXIT_IOBASE, ISA_DEBUG_EXIT_IOSIZE = 0xF4, 4
BOOT_STUB_ADDR = BIOS_AREA
MAX_CPUS = 255  # xAPIC IDs 0-254


class PC(Machine):
    """A Machine with the PC devices kernels probe: `isa_debug_exit` (0xf4), `fw_cfg` (0x510),
    `lapic` (0xfee00000). `ram_size` is 2 MiB to 3 GiB of RAM at 0, `cpus` 1 to 255, each of
    `cpu_model` with the features KVM cannot run dropped (`filtered_features` names them)."""

    def __init__(
        self,
        k: ModuleType | None = None,
        *,
        ram_size: int = PC_RAM_SIZE,
        cpus: int = 1,
        cpu_model: X86CPUDefinition | None = KVMLAB64,
        irqchip: str = "user",
    ) -> None:
        if not 0 < cpus <= MAX_CPUS:
            raise ValueError(f"a PC has 1 to {MAX_CPUS} vCPUs, not {cpus}")
        if not PC_MIN_RAM_SIZE <= ram_size <= PC_MAX_RAM_SIZE:
            raise ValueError(
                f"RAM must be {PC_MIN_RAM_SIZE >> 20} to {PC_MAX_RAM_SIZE >> 20} MiB, "
                f"not {ram_size / (1 << 20):g} MiB"
            )
        self.cpu_model = cpu_model
        self.cpu_features: dict[FeatureWord, int] | None = None  # filtered at the first vCPU
        self.filtered_features: list[str] = []
        super().__init__(k, ram_size=ram_size, cpus=cpus, irqchip=irqchip)
        try:
            self._add_devices(cpus, ram_size)
        except BaseException:
            self.close()
            raise

    def cpu_init(self, kvm: KVMState, index: int) -> CPUState:
        """An X86CPU of the PC's model, APIC ID = its index (kvm_arch_init_vcpu sets its CPUID)."""
        if self.cpu_model is not None and self.cpu_features is None:
            supported = kvm_arch_get_supported_cpuid(kvm.k, kvm.fd)
            self.cpu_features, self.filtered_features = x86_cpu_filter_features(
                self.cpu_model, supported
            )
            for name in self.filtered_features:
                log.warning("host doesn't support requested feature: %s", name)
        features = self.cpu_features or {}
        cpu = kvm_init_vcpu(
            kvm, index, self, X86CPU, model=self.cpu_model, features=features, apic_id=index
        )
        self._save_boot_state(cpu)
        return cpu

    def _add_devices(self, cpus: int, ram_size: int) -> None:
        self.isa_debug_exit = self.io.register(
            ISA_DEBUG_EXIT_IOBASE,
            ISA_DEBUG_EXIT_IOSIZE,
            DebugExit(on_exit=self.qemu_system_shutdown_request),
        )
        self.fw_cfg = self.io.register(FW_CFG_IO_BASE, FW_CFG_IO_SIZE, FwCfgIo())
        self.fw_cfg.fw_cfg_add_i64(FW_CFG_RAM_SIZE, ram_size)
        self.fw_cfg.fw_cfg_add_i16(FW_CFG_NB_CPUS, cpus)
        self.fw_cfg.fw_cfg_add_i16(FW_CFG_MAX_CPUS, cpus)
        self.fw_cfg.fw_cfg_add_file("etc/e820", struct.pack("<QQI", 0, ram_size, E820_RAM))
        if not self.kernel_irqchip:  # else KVM answers the page
            self.lapic = self.mmio.register(
                APIC_DEFAULT_ADDRESS, APIC_SPACE_SIZE, LocalApicRegisters(self.current_cpu_index)
            )

    def current_cpu_index(self) -> int:
        """The vCPU whose thread is running this code (0 outside any vCPU)."""
        me = threading.get_ident()
        return next((c.cpu_index for c in self.cpus if c.thread_id == me), 0)

    def load_kernel(self, image: bytes, name: str = "kernel", cmdline: str = "") -> None:
        """QEMU's -kernel for a multiboot image: load it and its information, and point
        vCPU 0 at the boot stub (MultibootError for an image that cannot boot)."""
        entry = load_multiboot(self.load_at, image, len(self.ram), name, cmdline)
        self.load(boot_stub(entry), BOOT_STUB_ADDR)
        self.setup_cpu(0, "protected", BOOT_STUB_ADDR)


def pc_boot_kernel(
    image: bytes,
    k: ModuleType | None = None,
    *,
    name: str = "kernel",
    cmdline: str = "",
    cpus: int = 1,
    ram_size: int = PC_RAM_SIZE,
    cpu_model: X86CPUDefinition | None = KVMLAB64,
    irqchip: str = "user",
) -> PC:
    """A PC on backend `k` with the multiboot kernel `image` loaded, ready to run.

    `name` and `cmdline` make the kernel's command line ("NAME CMDLINE", as QEMU passes it).
    An image that cannot boot raises MultibootError (a ValueError) before any VM is made.
    """
    parse_kernel(image)
    pc = PC(k, ram_size=ram_size, cpus=cpus, cpu_model=cpu_model, irqchip=irqchip)
    try:
        pc.load_kernel(image, name, cmdline)
    except BaseException:
        pc.close()
        raise
    return pc
