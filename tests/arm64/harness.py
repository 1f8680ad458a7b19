"""Helpers for the arm64 tests: a VM with RAM where QEMU's virt has it, its vCPUs, ONE_REG.

There is no arm64 host here: expected values come from upstream arm64 KVM (Linux 6.12
arm.c, guest.c, psci.c, mmio.c, handle_exit.c) and Documentation/virt/kvm/api.rst.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

from kvmlab import sys_arm64 as k
from kvmlab.asm import assemble
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_ONE_REG,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_ONE_REG,
    KVM_SET_USER_MEMORY_REGION,
    kvm_one_reg,
    kvm_userspace_memory_region,
)
from kvmlab.uapi.arm64 import (
    KVM_ARM_TARGET_GENERIC_V8,
    KVM_ARM_VCPU_INIT,
    KVM_ARM_VCPU_PSCI_0_2,
    KVM_REG_ARM_CORE_REG_X,
    REG_PC,
    kvm_run,
    kvm_vcpu_init,
)

RAM_BASE = 0x40000000
RAM_SIZE = 0x10000
PSCI = 1 << KVM_ARM_VCPU_PSCI_0_2


class Vm:
    """/dev/kvm, a VM with RAM at 0x40000000 (as QEMU's virt), and its vCPUs; all closed after."""

    def __init__(self) -> None:
        self.kvm = k.open("/dev/kvm", os.O_RDWR)
        self.fd = k.ioctl(self.kvm, KVM_CREATE_VM, 0)
        self.ram = mmap.mmap(-1, RAM_SIZE)
        self.k = k
        region = kvm_userspace_memory_region(
            slot=0,
            guest_phys_addr=RAM_BASE,
            memory_size=RAM_SIZE,
            userspace_addr=ctypes.addressof(ctypes.c_char.from_buffer(self.ram)),
        )
        k.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        self.vcpus: list[Vcpu] = []

    def vcpu(self, id_: int = 0, features: int | None = PSCI) -> Vcpu:
        """A vCPU, initialised with `features` (None: left uninitialised)."""
        vcpu = Vcpu(self, id_)
        self.vcpus.append(vcpu)
        if features is not None:
            vcpu.init(features)
        return vcpu

    def load(self, source: str, at: int = RAM_BASE) -> None:
        code = assemble(source, arch="arm64", base=at).code
        self.ram[at - RAM_BASE : at - RAM_BASE + len(code)] = code

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        k.close(self.fd)
        k.close(self.kvm)


class Vcpu:
    def __init__(self, vm: Vm, id_: int) -> None:
        self.fd = k.ioctl(vm.fd, KVM_CREATE_VCPU, id_)
        size = k.ioctl(vm.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.map = k.mmap(self.fd, size)
        self.run_struct = kvm_run.from_buffer(self.map)

    def init(self, features: int, target: int = KVM_ARM_TARGET_GENERIC_V8) -> None:
        init = kvm_vcpu_init(target=target)
        init.features[0] = features
        k.ioctl(self.fd, KVM_ARM_VCPU_INIT, init)

    def get(self, id_: int) -> int:
        value = (ctypes.c_uint8 * 16)()
        k.ioctl(self.fd, KVM_GET_ONE_REG, kvm_one_reg(id=id_, addr=ctypes.addressof(value)))
        return int.from_bytes(bytes(value), "little")

    def set(self, id_: int, value: int, size: int = 8) -> None:
        buf = (ctypes.c_uint8 * 16).from_buffer_copy(value.to_bytes(16, "little"))
        k.ioctl(self.fd, KVM_SET_ONE_REG, kvm_one_reg(id=id_, addr=ctypes.addressof(buf)))

    def x(self, n: int) -> int:
        return self.get(KVM_REG_ARM_CORE_REG_X(n))

    @property
    def pc(self) -> int:
        return self.get(REG_PC)

    def run(self) -> kvm_run:
        k.ioctl(self.fd, KVM_RUN, 0)
        return self.run_struct

    def close(self) -> None:
        del self.run_struct
        with contextlib.suppress(BufferError):  # a failed test's traceback may hold a view
            self.map.close()
        k.close(self.fd)
