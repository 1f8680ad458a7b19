"""Sample guests: small programs that each show one part of the KVM path, ready to boot.

Each sample is an assembly source in this package (`<name>.asm`, kvmlab's Keystone dialect)
with its assembled bytes beside it (`bin/<name>.bin`), so the samples run where Keystone cannot
be installed; a test checks that the two never drift apart. Boot one on a Machine:

    from kvmlab.guests import SAMPLES
    guest = SAMPLES["hello-long"]
    with guest.machine() as m:       # or guest.machine(kvmlab.host)
        guest.run(m)
        print(m.serial.text())

x86 samples run with the irqchip in userspace or in the kernel (`guest.machine(k,
irqchip="kernel")`); `smp-sipi` needs the kernel's, whose local APICs carry its INIT and SIPI.
The arm64 samples (`ARM64_SAMPLES`, sources in `arm64/`) boot the same way on the `virt`
board over the simulated arm64 /dev/kvm (`kvmlab.sys_arm64`).
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from types import ModuleType

from kvmlab.vmm import Machine, ScratchDevice
from kvmlab.vmm.hw.fw_cfg import FW_CFG_IO_BASE, FW_CFG_IO_SIZE, FW_CFG_NB_CPUS, FwCfgIo
from kvmlab.vmm.machine import MachineState
from kvmlab.vmm.virt import VIRT_MEM, Virt

GUEST_BASE = 0x1000
MMIO_SCRATCH_BASE = 0xD0000000  # outside RAM: every access is an MMIO exit


@dataclasses.dataclass(frozen=True)
class SampleGuest:
    """A sample: its source file, CPU mode, vCPU count, and what the VMM must add for it."""

    name: str
    title: str
    mode: str  # "real", "protected" or "long" on x86; "aarch64" on arm64
    cpus: int = 1
    serial_input: bytes = b""  # typed on COM1 before the guest starts
    mmio_scratch: bool = False  # a ScratchDevice at MMIO_SCRATCH_BASE
    arch: str = "x86"  # "x86" (the PC Machine) or "arm64" (the virt board), as kvmlab.asm
    fw_cfg: bool = False  # fw_cfg at 0x510, with the vCPU count (FW_CFG_NB_CPUS)
    sipi: bool = False  # only vCPU 0 boots; the guest starts the others with INIT and SIPI

    @property
    def file(self) -> str:
        """The path of its source and bytes below this package, without the extension."""
        name = self.name.replace("-", "_")
        return name if self.arch == "x86" else f"{self.arch}/{name}"

    @property
    def source(self) -> str:
        return resources.files(__package__).joinpath(f"{self.file}.asm").read_text()

    @property
    def code(self) -> bytes:
        """The assembled bytes, loaded at `base`."""
        return resources.files(__package__).joinpath(self.bin_path).read_bytes()

    @property
    def bin_path(self) -> str:
        """Where the bytes are, below this package (`python -m kvmlab.guests` writes them)."""
        directory, _, name = self.file.rpartition("/")
        return f"{directory}/bin/{name}.bin".lstrip("/")

    @property
    def base(self) -> int:
        """The guest-physical address the code is assembled for and loaded at."""
        return GUEST_BASE if self.arch == "x86" else VIRT_MEM

    @property
    def asm_mode(self) -> str:
        return {"real": "16", "protected": "32", "long": "64", "aarch64": "64"}[self.mode]

    @property
    def irqchip(self) -> str:
        """Where the x86 sample's interrupt controllers are unless told: "kernel" for a
        sample that starts its APs with INIT and SIPI, else "user"."""
        return "kernel" if self.sipi else "user"

    def machine(
        self, k: ModuleType | None = None, *, irqchip: str | None = None, cpus: int | None = None
    ) -> MachineState:
        """A board on the syscall face `k` with this guest booted and its devices added:
        the PC `Machine` for x86, `Virt` for arm64 (default face: `kvmlab.sys_arm64`).

        `irqchip` ("user" or "kernel", x86 only; default: the sample's own) and `cpus` (default:
        the sample's) change the board. A sample whose APs wait for INIT and SIPI is refused
        with the irqchip in userspace (ValueError): no vCPU has a local APIC to send them.
        """
        irqchip = irqchip or self.irqchip
        cpus = cpus or self.cpus
        if self.arch == "arm64":
            if irqchip != "user":
                raise ValueError(f"{self.name}: the arm64 board has no in-kernel irqchip")
            virt = Virt(k, cpus=cpus)
            try:
                virt.boot(self.code, self.base)
                virt.serial.feed(self.serial_input)
            except BaseException:
                virt.close()
                raise
            return virt
        if self.sipi and irqchip != "kernel":
            raise ValueError(
                f"{self.name}: its BSP starts the other vCPUs with INIT and SIPI through its "
                "local APIC, and with the irqchip in userspace no vCPU has one (kvmlab's VMM "
                "models no APIC): run it with irqchip='kernel' (kvmlab run --irqchip kernel)"
            )
        m = Machine(k, cpus=cpus, irqchip=irqchip)
        try:
            if self.mmio_scratch:
                m.mmio.register(MMIO_SCRATCH_BASE, 0x100, ScratchDevice())
            if self.fw_cfg:
                fw_cfg = m.io.register(FW_CFG_IO_BASE, FW_CFG_IO_SIZE, FwCfgIo())
                fw_cfg.fw_cfg_add_i16(FW_CFG_NB_CPUS, cpus)
            m.boot(self.code, self.mode, self.base, aps=not self.sipi)
            m.serial.feed(self.serial_input)
        except BaseException:
            m.close()
            raise
        return m

    def run(self, m: MachineState, timeout: float = 10.0, max_exits: int = 100_000) -> bool:
        """Run until every vCPU halts for good or the machine stops; False if `timeout` (for
        several vCPUs, on their threads) or `max_exits` (one vCPU, on this thread) ran out."""
        if len(m.cpus) == 1:
            before = m.cpus[0].runs
            m.run(max_exits=max_exits)
            return m.cpus[0].runs - before < max_exits
        m.start()
        try:
            return m.wait(timeout)
        finally:
            if m.state == "running":  # not stopped by the guest (an arm64 SYSTEM_OFF)
                m.pause()


SAMPLES = {
    g.name: g
    for g in (
        SampleGuest("hello-real", "hello over COM1 in real mode, polling LSR", "real"),
        SampleGuest("hello-protected", "hello over COM1 in 32-bit protected mode", "protected"),
        SampleGuest("hello-long", "hello in long mode with one `rep outsb` exit", "long"),
        SampleGuest("echo", "echo COM1 input until '.'", "real", serial_input=b"kvm."),
        SampleGuest("timer", "ten PIT interrupts through the 8259, counted", "real"),
        SampleGuest(
            "mmio",
            "store, load and read-modify-write on an MMIO device",
            "protected",
            mmio_scratch=True,
        ),
        SampleGuest("smp", "two vCPUs hand-shake over shared memory", "real", cpus=2),
        SampleGuest(
            "smp-sipi",
            "the BSP starts the APs with INIT and SIPI (in-kernel irqchip)",
            "real",
            cpus=2,
            fw_cfg=True,
            sipi=True,
        ),
    )
}

ARM64_SAMPLES = {
    g.name: g
    for g in (
        SampleGuest("hello", "hello over the PL011, then PSCI SYSTEM_OFF", "aarch64", arch="arm64"),
        SampleGuest(
            "psci", "PSCI_VERSION answered by KVM, SYSTEM_OFF by the VMM", "aarch64", arch="arm64"
        ),
        SampleGuest(
            "smp",
            "vCPU 0 starts vCPU 1 with PSCI CPU_ON; they hand-shake over shared memory",
            "aarch64",
            cpus=2,
            arch="arm64",
        ),
    )
}
