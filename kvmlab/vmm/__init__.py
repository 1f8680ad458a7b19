"""kvmlab's userspace VMM: a small QEMU on top of a KVM syscall face.

It speaks only to a syscall face (`kvmlab.sys`, the simulated /dev/kvm, or `kvmlab.host`, the
real one) and reads the ABI from `kvmlab.uapi`; it never imports the simulated kernel.

    from kvmlab.vmm import Machine
    with Machine() as m:                      # or Machine(kvmlab.host)
        m.boot(code, mode="long", entry=0x1000)
        m.run()                               # on this thread, until HLT
        print(m.serial.text(), m.exit_log.reasons())

Modules follow QEMU's: `kvm_all` (accel/kvm/kvm-all.c: kvm_cpu_exec), `i386` (the x86 hooks
of target/i386/kvm/kvm.c), `arm` (those of target/arm/kvm.c), `machine` (the vCPU threads of
kvm-accel-ops.c and cpus.c, and the PC board), `virt` (the arm64 board of hw/arm/virt.c),
`memory` (buses), `hw` (devices), `boot` (what a loader does).
"""

from kvmlab.vmm.boot import setup_long_mode, setup_protected_mode, setup_real_mode
from kvmlab.vmm.cpu import EXCP_DEBUG, EXCP_HLT, EXCP_INTERRUPT, CPUState
from kvmlab.vmm.exitlog import ExitLog, ExitRecord
from kvmlab.vmm.hw import PL011, DebugCon, DebugExit, ScratchDevice, Serial16550
from kvmlab.vmm.kvm_all import kvm_cpu_exec, kvm_handle_io
from kvmlab.vmm.machine import Machine, MachineState
from kvmlab.vmm.memory import Device, IoBus, MmioBus, MmioDevice
from kvmlab.vmm.virt import Virt

__all__ = [
    "EXCP_DEBUG",
    "EXCP_HLT",
    "EXCP_INTERRUPT",
    "PL011",
    "CPUState",
    "DebugCon",
    "DebugExit",
    "Device",
    "ExitLog",
    "ExitRecord",
    "IoBus",
    "Machine",
    "MachineState",
    "MmioBus",
    "MmioDevice",
    "ScratchDevice",
    "Serial16550",
    "Virt",
    "kvm_cpu_exec",
    "kvm_handle_io",
    "setup_long_mode",
    "setup_protected_mode",
    "setup_real_mode",
]
