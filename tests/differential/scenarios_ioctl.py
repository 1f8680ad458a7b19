"""Scenarios for the system and VM fds: API version, capabilities, VM/vCPU creation, wrong fds."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from kvmlab.uapi import (
    KVM_CAP_CHECK_EXTENSION_VM,
    KVM_CAP_HLT,
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_NR_VCPUS,
    KVM_CAP_SET_TSS_ADDR,
    KVM_CAP_USER_MEMORY,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_REGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_INTERRUPT,
    KVM_NMI,
    KVM_RUN,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    kvm_regs,
)
from kvmlab.uapi.ioctl import _IO, _IOC, _IOR, _IOW

from .guest import Fds, try_ioctl
from .registry import scenario

# Not in kvmlab.uapi (yet): defined here from <linux/kvm.h>.
KVM_IRQ_LINE = _IOW(0xAE, 0x61, 8)  # struct kvm_irq_level
KVM_ARM_VCPU_INIT = _IOW(0xAE, 0xAE, 32)  # struct kvm_vcpu_init (arm64 only)
KVM_ARM_PREFERRED_TARGET = _IOR(0xAE, 0xAF, 32)  # struct kvm_vcpu_init (arm64 only)
KVM_UNKNOWN = _IO(0xAE, 0xFF)  # a number KVM does not define
FOREIGN_TYPE_RUN = _IO(0xAF, 0x80)  # KVM_RUN's number with type byte 0xAF instead of KVMIO
# KVM_GET_REGS with a size field one byte too big: a different, unknown request number.
KVM_GET_REGS_WRONG_SIZE = _IOR(0xAE, 0x81, ctypes.sizeof(kvm_regs) + 1)

UNKNOWN_CAP = 99999


def ioctl_size(request: int) -> int:
    """The size field of a request number."""
    return (request >> 16) & 0x3FFF


def probe(k: Any, fd: int, request: int, arg: int | None = None) -> int | str:
    """Issue `request` with a zeroed buffer of its size (or the int `arg`); result or errno name."""
    size = ioctl_size(request)
    if arg is None and size:
        return try_ioctl(k, fd, request, bytearray(size))
    return try_ioctl(k, fd, request, arg or 0)


@scenario
def api_version(k: Any) -> dict[str, Any]:
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        out = {
            "arg0": try_ioctl(k, sys_fd, KVM_GET_API_VERSION, 0),
            "arg1": try_ioctl(k, sys_fd, KVM_GET_API_VERSION, 1),
            "arg_minus1": try_ioctl(k, sys_fd, KVM_GET_API_VERSION, -1),
        }
    assert out["arg0"] == 12
    assert out["arg1"] == "EINVAL"
    return out


IMPORTANT_CAPS = {
    "USER_MEMORY": KVM_CAP_USER_MEMORY,
    "NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS,
    "MAX_VCPUS": KVM_CAP_MAX_VCPUS,
    "MAX_VCPU_ID": KVM_CAP_MAX_VCPU_ID,
    "NR_VCPUS": KVM_CAP_NR_VCPUS,
    "IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
    "CHECK_EXTENSION_VM": KVM_CAP_CHECK_EXTENSION_VM,
    "HLT": KVM_CAP_HLT,
    "SET_TSS_ADDR": KVM_CAP_SET_TSS_ADDR,
    "UNKNOWN_99999": UNKNOWN_CAP,
}


def expected_caps() -> dict[str, int]:
    return {
        "USER_MEMORY": 1,
        "NR_MEMSLOTS": 32764,
        "MAX_VCPUS": 1024,
        "MAX_VCPU_ID": 4096,
        "NR_VCPUS": min(os.cpu_count() or 1, 1024),
        "IMMEDIATE_EXIT": 1,
        "CHECK_EXTENSION_VM": 1,
        "HLT": 1,
        "SET_TSS_ADDR": 1,
        "UNKNOWN_99999": 0,
    }


def check_caps(k: Any, fd: int) -> dict[str, int | str]:
    caps = {
        name: try_ioctl(k, fd, KVM_CHECK_EXTENSION, cap) for name, cap in IMPORTANT_CAPS.items()
    }
    for name, value in expected_caps().items():
        assert caps[name] == value, (name, caps[name], value)
    return caps


@scenario
def check_extension_system_fd(k: Any) -> dict[str, int | str]:
    with Fds(k) as fds:
        return check_caps(k, fds.open_kvm())


@scenario
def check_extension_vm_fd(k: Any) -> dict[str, Any]:
    """The VM fd answers KVM_CHECK_EXTENSION too, with the same values here."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        on_sys = check_caps(k, sys_fd)
        on_vm = check_caps(k, vm_fd)
    assert on_vm == on_sys
    return {"sys": on_sys, "vm": on_vm}


@scenario
def vcpu_mmap_size(k: Any) -> dict[str, int | str]:
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        out = {
            "arg0": try_ioctl(k, sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0),
            "arg1": try_ioctl(k, sys_fd, KVM_GET_VCPU_MMAP_SIZE, 1),
        }
    assert out == {"arg0": 12288, "arg1": "EINVAL"}
    return out


@scenario
def create_vm_types(k: Any) -> dict[str, int | str]:
    """Type 0 is the only x86 machine type here; 1 and 0xdead are EINVAL."""
    out: dict[str, int | str] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        for type_ in (0, 1, 0xDEAD):
            r = try_ioctl(k, sys_fd, KVM_CREATE_VM, type_)
            if isinstance(r, int):
                fds.track(r)
                r = "fd"
            out[hex(type_)] = r
    assert out == {"0x0": "fd", "0x1": "EINVAL", "0xdead": "EINVAL"}
    return out


@scenario
def create_vcpu_ids(k: Any) -> dict[str, int | str]:
    """vCPU ids run from 0 to KVM_MAX_VCPU_IDS-1 = 4095; 4096 and -1 are EINVAL."""
    out: dict[str, int | str] = {}
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        for vcpu_id in (4096, -1, 0x10000, 4095, 0):
            r = try_ioctl(k, vm_fd, KVM_CREATE_VCPU, vcpu_id)
            if isinstance(r, int):
                fds.track(r)
                r = "fd"
            out[str(vcpu_id)] = r
    assert out == {"4096": "EINVAL", "-1": "EINVAL", "65536": "EINVAL", "4095": "fd", "0": "fd"}
    return out


@scenario
def create_vcpu_duplicate(k: Any) -> dict[str, int | str]:
    """A vCPU id can be created once per VM, even after its fd was closed (vCPUs are not freed)."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        first = fds.create_vcpu(vm_fd, 3)
        dup = try_ioctl(k, vm_fd, KVM_CREATE_VCPU, 3)
        fds.close(first)
        dup_after_close = try_ioctl(k, vm_fd, KVM_CREATE_VCPU, 3)
        other = try_ioctl(k, vm_fd, KVM_CREATE_VCPU, 4)
        if isinstance(other, int):
            fds.track(other)
            other = "fd"
        # a second VM has its own id space
        vm2 = fds.create_vm(sys_fd)
        in_vm2 = try_ioctl(k, vm2, KVM_CREATE_VCPU, 3)
        if isinstance(in_vm2, int):
            fds.track(in_vm2)
            in_vm2 = "fd"
    out = {"dup": dup, "dup_after_close": dup_after_close, "other": other, "in_vm2": in_vm2}
    assert out == {"dup": "EEXIST", "dup_after_close": "EEXIST", "other": "fd", "in_vm2": "fd"}
    return out


# The wrong-fd table of kvm-api-notes §1: (name, request, int argument or None for a buffer).
# Requests that would succeed and change state (KVM_RUN on a vCPU, KVM_CREATE_IRQCHIP on a VM...)
# are only issued on the fds where they fail.
SYSTEM_FD_PROBES: list[tuple[str, int, int | None]] = [
    ("GET_API_VERSION", KVM_GET_API_VERSION, 0),
    ("CHECK_EXTENSION", KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY),
    ("GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, 0),
    ("RUN", KVM_RUN, 0),
    ("CREATE_VCPU", KVM_CREATE_VCPU, 0),
    ("SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, None),
    ("GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, None),
    ("CREATE_IRQCHIP", KVM_CREATE_IRQCHIP, 0),
    ("SET_TSS_ADDR", KVM_SET_TSS_ADDR, 0xFFFBD000),
    ("IRQ_LINE", KVM_IRQ_LINE, None),
    ("GET_REGS", KVM_GET_REGS, None),
    ("NMI", KVM_NMI, 0),
    ("INTERRUPT", KVM_INTERRUPT, None),
    ("SET_GUEST_DEBUG", KVM_SET_GUEST_DEBUG, None),
]

VM_FD_PROBES: list[tuple[str, int, int | None]] = [
    ("CHECK_EXTENSION", KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY),
    ("RUN", KVM_RUN, 0),
    ("CREATE_VM", KVM_CREATE_VM, 0),
    ("GET_API_VERSION", KVM_GET_API_VERSION, 0),
    ("GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, 0),
    ("GET_REGS", KVM_GET_REGS, None),
    ("NMI", KVM_NMI, 0),
    ("INTERRUPT", KVM_INTERRUPT, None),
    ("SET_GUEST_DEBUG", KVM_SET_GUEST_DEBUG, None),
]

VCPU_FD_PROBES: list[tuple[str, int, int | None]] = [
    ("CREATE_VM", KVM_CREATE_VM, 0),
    ("CREATE_VCPU", KVM_CREATE_VCPU, 1),
    ("GET_API_VERSION", KVM_GET_API_VERSION, 0),
    ("CHECK_EXTENSION", KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY),
    ("GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, 0),
    ("SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, None),
    ("GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, None),
    ("CREATE_IRQCHIP", KVM_CREATE_IRQCHIP, 0),
    ("SET_TSS_ADDR", KVM_SET_TSS_ADDR, 0xFFFBD000),
    ("IRQ_LINE", KVM_IRQ_LINE, None),
]

# Numbers no fd knows: unknown nr, foreign type byte, arm64-only, wrong size field.
UNKNOWN_PROBES: list[tuple[str, int, int | None]] = [
    ("UNKNOWN_NR_0xff", KVM_UNKNOWN, 0),
    ("FOREIGN_TYPE_0xAF", FOREIGN_TYPE_RUN, 0),
    ("FOREIGN_TYPE_0x00", _IOC(0, 0x00, 0x80, 0), 0),
    ("ARM_PREFERRED_TARGET", KVM_ARM_PREFERRED_TARGET, None),
    ("ARM_VCPU_INIT", KVM_ARM_VCPU_INIT, None),
    ("GET_REGS_WRONG_SIZE", KVM_GET_REGS_WRONG_SIZE, None),
]


def run_probes(
    k: Any, fds: Fds, fd: int, probes: list[tuple[str, int, int | None]]
) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for name, request, arg in probes:
        r = probe(k, fd, request, arg)
        if isinstance(r, int) and request in (KVM_CREATE_VM, KVM_CREATE_VCPU):
            fds.track(r)
            r = "fd"
        out[name] = r
    return out


@scenario
def wrong_fd_system(k: Any) -> dict[str, int | str]:
    """The system fd: its own ioctls work, every VM/vCPU ioctl is EINVAL (kvm_arch_dev_ioctl)."""
    with Fds(k) as fds:
        out = run_probes(k, fds, fds.open_kvm(), SYSTEM_FD_PROBES)
    assert out["GET_API_VERSION"] == 12
    assert out["CHECK_EXTENSION"] == 1
    assert out["GET_VCPU_MMAP_SIZE"] == 12288
    for name in list(out)[3:]:
        assert out[name] == "EINVAL", (name, out[name])
    return out


@scenario
def wrong_fd_vm(k: Any) -> dict[str, int | str]:
    """The x86 VM fd's default is ENOTTY (kvm_arch_vm_ioctl), unlike the other two fds."""
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        out = run_probes(k, fds, vm_fd, VM_FD_PROBES)
    assert out["CHECK_EXTENSION"] == 1
    for name in list(out)[1:]:
        assert out[name] == "ENOTTY", (name, out[name])
    return out


@scenario
def wrong_fd_vcpu(k: Any) -> dict[str, int | str]:
    """The vCPU fd's default is EINVAL."""
    with Fds(k) as fds:
        vm_fd = fds.create_vm(fds.open_kvm())
        vcpu_fd = fds.create_vcpu(vm_fd, 0)
        out = run_probes(k, fds, vcpu_fd, VCPU_FD_PROBES)
    for name, value in out.items():
        assert value == "EINVAL", (name, value)
    return out


@scenario
def unknown_ioctls_each_fd(k: Any) -> dict[str, dict[str, int | str]]:
    """Unknown numbers: EINVAL on the system and vCPU fds, ENOTTY on the x86 VM fd."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm_fd = fds.create_vm(sys_fd)
        vcpu_fd = fds.create_vcpu(vm_fd, 0)
        out = {
            "system": run_probes(k, fds, sys_fd, UNKNOWN_PROBES),
            "vm": run_probes(k, fds, vm_fd, UNKNOWN_PROBES),
            "vcpu": run_probes(k, fds, vcpu_fd, UNKNOWN_PROBES),
        }
    for kind, expected in (("system", "EINVAL"), ("vm", "ENOTTY"), ("vcpu", "EINVAL")):
        for name, value in out[kind].items():
            assert value == expected, (kind, name, value)
    return out
