"""Scenarios for KVM_GET/SET_VCPU_EVENTS (queued exception, interrupt, NMIs, the interrupt
shadow, and what is refused), KVM_GET/SET_FPU, and KVM_SET_IDENTITY_MAP_ADDR.

PVM≠VMX: the host's KVM_GET_FPU always reads MXCSR as 0, even after KVM_SET_FPU; kvmlab gives
the architectural reset value 0x1f80 and what was set.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvmlab.uapi import (
    KVM_GET_FPU,
    KVM_GET_VCPU_EVENTS,
    KVM_NMI,
    KVM_SET_FPU,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_VCPU_EVENTS,
    KVM_VCPUEVENT_VALID_PAYLOAD,
    KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
    kvm_fpu,
    kvm_vcpu_events,
)

from .guest import Fds, machine, try_ioctl
from .registry import host_is_pvm, scenario
from .scenarios_faults import HANDLER_ADDR, UD, load_tables
from .scenarios_irq import name


def get_events(m: Any) -> kvm_vcpu_events:
    events = kvm_vcpu_events()
    k = m.k
    k.ioctl(m.vcpu_fd, KVM_GET_VCPU_EVENTS, events)
    return events


def summary(e: kvm_vcpu_events) -> dict[str, Any]:
    return {
        "exception": (e.exception.injected, e.exception.nr, e.exception.has_error_code),
        "interrupt": (e.interrupt.injected, e.interrupt.nr, e.interrupt.soft, e.interrupt.shadow),
        "nmi": (e.nmi.injected, e.nmi.pending, e.nmi.masked),
        "flags": e.flags,
        "smi": bytes(e.smi),
        "triple_fault": e.triple_fault.pending,
    }


def set_events(m: Any, e: kvm_vcpu_events) -> int | str:
    return try_ioctl(m.k, m.vcpu_fd, KVM_SET_VCPU_EVENTS, bytes(e))


@scenario
def vcpu_events_get(k: Any) -> dict[str, Any]:
    """A new vCPU has no events (flags: NMI_PENDING | SHADOW | SMM); KVM_NMI queues NMIs, at
    most two at a time."""
    with machine(k, b"\xf4") as m:
        out: dict[str, Any] = {"reset": summary(get_events(m))}
        k.ioctl(m.vcpu_fd, KVM_NMI, 0)
        out["one_nmi"] = summary(get_events(m))["nmi"]
        k.ioctl(m.vcpu_fd, KVM_NMI, 0)
        k.ioctl(m.vcpu_fd, KVM_NMI, 0)
        out["three_nmis"] = summary(get_events(m))["nmi"]
    assert out["reset"]["flags"] == 0xD and out["one_nmi"] == (0, 1, 0)
    assert out["three_nmis"] == (0, 2, 0)
    return out


@scenario
def vcpu_events_set_refused(k: Any) -> dict[str, Any]:
    """KVM_SET_VCPU_EVENTS refuses (EINVAL) unknown flags, a payload without the capability,
    a triple fault without the capability, an exception vector above 31 and an NMI vector."""
    with machine(k, b"\xf4") as m:
        out: dict[str, Any] = {}
        for label, flags in (
            ("unknown_flag", 1 << 7),
            ("payload", KVM_VCPUEVENT_VALID_PAYLOAD),
            ("triple_fault", KVM_VCPUEVENT_VALID_TRIPLE_FAULT),
        ):
            out[label] = set_events(m, kvm_vcpu_events(flags=flags))
        for nr in (2, 32):
            e = kvm_vcpu_events()
            e.exception.injected, e.exception.nr = 1, nr
            out[f"exception_{nr}"] = set_events(m, e)
        out["smm_off"] = set_events(m, kvm_vcpu_events(flags=KVM_VCPUEVENT_VALID_SMM))
        out["after"] = summary(get_events(m))
    assert all(out[key] == "EINVAL" for key in ("unknown_flag", "payload", "triple_fault"))
    assert out["exception_2"] == out["exception_32"] == "EINVAL" and out["smm_off"] == 0
    return out


@scenario
def vcpu_events_inject_exception(k: Any) -> dict[str, Any]:
    """An exception set as injected reads back, and the next KVM_RUN delivers it (#UD to the
    guest's handler in real mode, frame ip = the interrupted instruction)."""
    handler = b"\xb0\x06\xe6\x10\xf4"  # mov al, 6; out 0x10, al; hlt
    with machine(k, b"\x90\xf4") as m:
        m.write(HANDLER_ADDR, handler)
        load_tables(m, "real", {UD: HANDLER_ADDR})
        e = kvm_vcpu_events()
        e.exception.injected, e.exception.nr = 1, UD
        out: dict[str, Any] = {"set": set_events(m, e), "read": summary(get_events(m))}
        out["exit"] = name(m.run())
        out["vector"] = m.io()["data"]
        out["after"] = summary(get_events(m))["exception"]
    assert out["set"] == 0 and out["read"]["exception"] == (1, UD, 0)
    assert out["exit"] == "IO" and out["vector"] == bytes([UD])
    return out


@scenario(
    documented={
        "mxcsr": {"sim": 0x1F80, "host": 0 if host_is_pvm() else 0x1F80},
        "mxcsr_back": {"sim": 0x1FC0, "host": 0 if host_is_pvm() else 0x1FC0},
    }
)
def fpu_get_set(k: Any) -> dict[str, Any]:
    """KVM_GET_FPU on a new vCPU: FCW 0x37f, empty tags; KVM_SET_FPU then GET gives back the
    control word, a stack register, an XMM register and MXCSR."""
    with machine(k, b"\xf4") as m:
        fpu = kvm_fpu()
        k.ioctl(m.vcpu_fd, KVM_GET_FPU, fpu)
        out: dict[str, Any] = {"reset": (fpu.fcw, fpu.fsw, fpu.ftwx), "mxcsr": fpu.mxcsr}
        fpu.fcw, fpu.mxcsr, fpu.ftwx = 0x27F, 0x1F80 | 0x40, 0x01
        fpu.fpr[0][:] = list((0x8000_0000_0000_0000).to_bytes(8, "little") + b"\xff\x3f") + [0] * 6
        fpu.xmm[3][:] = list(range(16))
        out["set"] = try_ioctl(k, m.vcpu_fd, KVM_SET_FPU, bytes(fpu))
        back = kvm_fpu()
        k.ioctl(m.vcpu_fd, KVM_GET_FPU, back)
        out["back"] = (back.fcw, back.ftwx, bytes(back.xmm[3]))
        out["mxcsr_back"] = back.mxcsr
    assert out["reset"] == (0x37F, 0, 0) and out["set"] == 0
    assert out["back"] == (0x27F, 1, bytes(range(16)))
    return out


@scenario
def identity_map_addr(k: Any) -> dict[str, Any]:
    """KVM_SET_IDENTITY_MAP_ADDR takes a pointer to a u64 (any value), only before the first
    vCPU (then EINVAL, checked before the pointer); a bad pointer is EFAULT."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm = fds.create_vm(sys_fd)
        addr = ctypes.c_uint64(0xFFFB_C000)
        out: dict[str, Any] = {
            "default": try_ioctl(k, vm, KVM_SET_IDENTITY_MAP_ADDR, bytes(addr)),
            "high": try_ioctl(
                k, vm, KVM_SET_IDENTITY_MAP_ADDR, bytes(ctypes.c_uint64(2**64 - 4096))
            ),
            "bad_pointer": try_ioctl(k, vm, KVM_SET_IDENTITY_MAP_ADDR, 8),
        }
        fds.create_vcpu(vm)
        out["after_vcpu"] = try_ioctl(k, vm, KVM_SET_IDENTITY_MAP_ADDR, bytes(addr))
        out["after_vcpu_bad_pointer"] = try_ioctl(k, vm, KVM_SET_IDENTITY_MAP_ADDR, 8)
    assert out["default"] == out["high"] == 0 and out["bad_pointer"] == "EFAULT"
    assert out["after_vcpu"] == out["after_vcpu_bad_pointer"] == "EINVAL"
    return out
