"""Processes and threads as KVM sees them: the VM belongs to the mm that created it."""

from __future__ import annotations

import ast
import os
import struct
import threading
from typing import Any

from kvmlab.uapi import (
    KVM_CAP_USER_MEMORY,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VCPU,
    KVM_GET_API_VERSION,
    KVM_GET_REGS,
    KVM_RUN,
    KVM_SET_SREGS,
    kvm_regs,
)

from .guest import Fds, errname, machine, set_regs
from .registry import scenario


def _in_child(k: Any, calls: list[tuple[int, int, Any]]) -> list[Any]:
    """Run ioctls in a forked child; each result (value or errno name) comes back by a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only this thread exists here
        results = []
        for fd, request, arg in calls:
            try:
                results.append(k.ioctl(fd, request, arg))
            except OSError as e:
                results.append(errname(e))
        os.write(write_end, repr(results).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return list(ast.literal_eval(data.decode()))


@scenario
def forked_child_gets_eio_on_vm_and_vcpu_fds(k: Any) -> dict[str, Any]:
    """After fork the child's VM and vCPU fds fail with EIO (kvm->mm is the parent's), while
    /dev/kvm still works in the child: KVM_GET_API_VERSION gives 12."""
    with Fds(k) as fds:
        sys_fd = fds.open_kvm()
        vm = fds.create_vm(sys_fd)
        vcpu = fds.create_vcpu(vm, 0)
        regs = kvm_regs()
        child = _in_child(
            k,
            [
                (sys_fd, KVM_GET_API_VERSION, 0),
                (vm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY),
                (vm, KVM_CREATE_VCPU, 1),
                (vcpu, KVM_GET_REGS, regs),
                (vcpu, KVM_RUN, 0),
            ],
        )
        parent = k.ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY)
    assert child == [12, "EIO", "EIO", "EIO", "EIO"]
    assert parent == 1
    return {"child": child, "parent": parent}


@scenario
def kvm_run_from_another_thread(k: Any) -> dict[str, Any]:
    """KVM_RUN from a thread other than the last one's works (vcpu->pid changes) and the guest
    carries on where it stopped."""
    code = bytes([0xE6, 0x10, 0xE6, 0x11, 0xF4])  # out 0x10, al / out 0x11, al / hlt
    ports = []
    with machine(k, code) as m:
        m.run()
        ports.append(m.io()["port"])
        worker = threading.Thread(target=lambda: ports.append(m.run()))
        worker.start()
        worker.join(10)
        ports.append(m.io()["port"])
        ports.append(m.run())
    assert ports == [0x10, 2, 0x11, 5]  # IO on the main thread, IO on the worker, then HLT
    return {"ports": ports}


LOCK_INC_LOOP = (
    b"\xb9\x40\x0d\x03\x00"  # 1000: mov ecx, 200000
    b"\xf0\xff\x05\x00\x30\x00\x00"  # 1005: lock inc dword ptr [0x3000]
    b"\x49"  # 100c: dec ecx
    b"\x75\xf6"  # 100d: jnz 1005
    b"\xf4"  # 100f: hlt
)


@scenario
def two_vcpus_lock_inc_is_atomic(k: Any) -> dict[str, Any]:
    """Two vCPUs on their own threads each `lock inc` one shared counter 200000 times: the
    total is exactly 400000, as on real hardware."""
    with machine(k, LOCK_INC_LOOP, "prot32") as m:
        second = m.fds.create_vcpu(m.vm_fd, 1)
        second_run = m.fds.map_run(m.sys_fd, second)
        set_regs(k, second, m.regs())
        k.ioctl(second, KVM_SET_SREGS, m.sregs())
        reasons: list[Any] = []

        def run(fd: int) -> None:
            k.ioctl(fd, KVM_RUN, 0)
            reasons.append(fd)

        threads = [threading.Thread(target=run, args=(fd,)) for fd in (m.vcpu_fd, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        total = struct.unpack_from("<I", m.mem, 0x3000)[0]
        exit_reasons = sorted([m.exit_reason, struct.unpack_from("<I", second_run, 8)[0]])
    assert len(reasons) == 2 and exit_reasons == [5, 5]  # both reached their HLT
    assert total == 400000
    return {"total": total, "exits": exit_reasons}
