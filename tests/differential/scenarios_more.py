"""More part-2 behaviour: capabilities, 64-bit MMIO, moved slots, and a signal mid-guest."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from kvmlab.uapi import (
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_READONLY_MEM,
    KVM_CAP_SET_GUEST_DEBUG,
    KVM_CAP_USER_NMI,
    KVM_CHECK_EXTENSION,
    KVM_EXIT_HLT,
    KVM_EXIT_INTR,
    KVM_EXIT_MMIO,
)

from .guest import Fds, machine, set_region
from .registry import host_is_pvm, scenario
from .scenarios_mmio import pick, run_mmio


@scenario
def check_extension_part2_caps(k: Any) -> dict[str, Any]:
    """What part 2 implements is announced, on /dev/kvm and on a VM fd alike."""
    caps = {
        "READONLY_MEM": KVM_CAP_READONLY_MEM,
        "SET_GUEST_DEBUG": KVM_CAP_SET_GUEST_DEBUG,
        "USER_NMI": KVM_CAP_USER_NMI,
        "IMMEDIATE_EXIT": KVM_CAP_IMMEDIATE_EXIT,
    }
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm = fds.create_vm(sys_fd)
        out = {
            name: (k.ioctl(sys_fd, KVM_CHECK_EXTENSION, cap), k.ioctl(vm, KVM_CHECK_EXTENSION, cap))
            for name, cap in caps.items()
        }
    assert all(v == (1, 1) for v in out.values()), out
    return out


MMIO64 = (
    b"\x48\xbb\x00\x00\x10\x00\x00\x00\x00\x00"  # 1000: movabs rbx, 0x100000
    b"\x48\x8b\x03"  # 100a: mov rax, qword ptr [rbx]
    b"\x48\x89\x43\x08"  # 100d: mov qword ptr [rbx + 8], rax
    b"\xf4"  # 1011: hlt
)


@scenario
def mmio_8_bytes_in_long_mode(k: Any) -> dict[str, Any]:
    """A 64-bit load and store on MMIO: one exit each with len 8, data little-endian."""
    with machine(k, MMIO64, "long64") as m:
        exits = run_mmio(m, [bytes(range(1, 9))], ("rax",))
    assert pick(exits, "phys_addr", "len", "is_write", "data", "rip") == [
        (0x100000, 8, 0, None, 0x100A),
        (0x100008, 8, 1, bytes(range(1, 9)), 0x1011),
        (None, None, None, None, 0x1012),
    ]
    assert exits[-1]["rax"] == 0x0807060504030201
    return {"exits": exits}


@scenario
def moved_slot_between_runs(k: Any) -> dict[str, Any]:
    """A second slot moved to another GPA between two runs: the old address becomes MMIO and
    the new one reads the same host memory."""
    code = b"\xa1\x00\x00\x02\x00" + b"\xa1\x00\x00\x03\x00" + b"\xf4"  # two loads, hlt
    with machine(k, code, "prot32") as m:
        extra, hva = m.fds.ram(0x1000)
        extra[0:4] = b"\x11\x22\x33\x44"
        moves = [set_region(k, m.vm_fd, 1, 0x20000, 0x1000, hva)]
        first = m.run()  # the load at 0x20000 is RAM: no exit before the second load
        first_mmio = (m.kvm_run().mmio.phys_addr, m.regs().rax)
        moves.append(set_region(k, m.vm_fd, 1, 0x30000, 0x1000, hva))  # move: 0x30000 now RAM
        m.runmap[40:44] = b"\x55\x66\x77\x88"
        second = m.run()
        rax = m.regs().rax
    assert moves == [0, 0]
    assert (first, first_mmio) == (KVM_EXIT_MMIO, (0x30000, 0x44332211))
    assert (second, rax) == (KVM_EXIT_HLT, 0x88776655)  # the pending read completes as MMIO
    return {"first": first, "first_mmio": first_mmio, "second": second, "rax": rax}


@scenario
def signal_interrupts_a_spinning_guest(k: Any) -> dict[str, Any]:
    """SIGUSR1 (a no-op handler) sent to the thread in KVM_RUN: EINTR and KVM_EXIT_INTR."""
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    result: list[Any] = []
    try:
        with machine(k, b"\xeb\xfe") as m:  # jmp $
            worker = threading.Thread(target=lambda: result.append(m.try_run()))
            worker.start()
            time.sleep(0.05)
            signal.pthread_kill(worker.ident or 0, signal.SIGUSR1)
            worker.join(5)
            alive = worker.is_alive()
            reason = m.exit_reason
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not alive and result == ["EINTR"] and reason == KVM_EXIT_INTR
    return {"result": result, "exit_reason": reason}


# VMX (unrestricted guest) stores segments as VMCS access rights: the accessed bit is forced on
# for every usable segment but LDTR, and a non-present segment becomes "unusable" with its
# attributes cleared. PVM keeps what was written.
VMX_SEGMENTS = {"ds_type": 3, "es": (0, 1, 0, 0), "ldt_type": 2}
PVM_SEGMENTS = {"ds_type": 2, "es": (0, 0, 3, 1), "ldt_type": 2}


@scenario(
    documented={
        "segments": {
            "sim": VMX_SEGMENTS,
            "host": PVM_SEGMENTS if host_is_pvm() else VMX_SEGMENTS,
        }
    }
)
def set_sregs_segment_attributes_as_vmx_stores_them(k: Any) -> dict[str, Any]:
    """KVM_SET_SREGS then KVM_GET_SREGS: a data segment without the accessed bit, a
    non-present ES, and an LDT of type 2 read back as the vendor stores them."""
    with machine(k, b"\xf4") as m:
        sregs = m.sregs()
        sregs.ds.type, sregs.es.present, sregs.ldt.type = 2, 0, 2
        m.set_sregs(sregs)
        back = m.sregs()
    seen = {
        "ds_type": back.ds.type,
        "es": (back.es.present, back.es.unusable, back.es.type, back.es.s),
        "ldt_type": back.ldt.type,
    }
    assert seen in (VMX_SEGMENTS, PVM_SEGMENTS)
    return {"segments": seen}
