"""A signal sent to a vCPU thread ends its KVM_RUN with EINTR and KVM_EXIT_INTR, as on the host.

Runs in a fresh interpreter per backend: how the simulator hears signals is process-wide state.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvmlab import host

SPINNING_VCPU = """\
import ctypes, importlib, mmap, os, signal, sys, threading, time
from kvmlab.uapi import *

k = importlib.import_module(sys.argv[1])
kvm = k.open("/dev/kvm", os.O_RDWR)
vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
ram = mmap.mmap(-1, 0x10000)
ram[0x1000:0x1002] = bytes([0xEB, 0xFE])  # jmp $
addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, len(ram), addr))
vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
run = kvm_run.from_buffer(k.mmap(vcpu, k.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)))
s = kvm_sregs(); k.ioctl(vcpu, KVM_GET_SREGS, s)
s.cs.base = s.cs.selector = 0; k.ioctl(vcpu, KVM_SET_SREGS, s)
k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
"""

PROGRAM = SPINNING_VCPU + textwrap.dedent(
    """
    signal.signal(signal.SIGUSR1, lambda *a: None)
    result = []
    def vcpu_thread():
        try:
            k.ioctl(vcpu, KVM_RUN, 0)
            result.append("returned")
        except OSError as e:
            result.append(e.errno)
    thread = threading.Thread(target=vcpu_thread)
    thread.start()
    time.sleep(0.3)
    signal.pthread_kill(thread.ident, signal.SIGUSR1)
    thread.join(5)
    print("alive" if thread.is_alive() else "done", result, run.exit_reason)
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.mark.parametrize("backend", ["kvmlab.sys", "kvmlab.host"])
def test_signal_to_a_vcpu_thread_in_a_guest_loop_gives_eintr_and_exit_intr(backend: str) -> None:
    if backend == "kvmlab.host" and host.available() is not None:
        pytest.skip(f"host /dev/kvm unusable: {host.available()}")
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, backend], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "done [4] 10", out.stderr  # EINTR, KVM_EXIT_INTR


CTRL_C = SPINNING_VCPU + textwrap.dedent(
    """
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    try:
        k.ioctl(vcpu, KVM_RUN, 0)
        print("returned")
    except KeyboardInterrupt:
        regs = kvm_regs(); k.ioctl(vcpu, KVM_GET_REGS, regs)
        print("KeyboardInterrupt", run.exit_reason, hex(regs.rip))
    """
)


@pytest.mark.parametrize("backend", ["kvmlab.sys", "kvmlab.host"])
def test_ctrl_c_in_the_main_thread_stops_a_spinning_guest(backend: str) -> None:
    """A notebook's interrupt (SIGINT) during KVM_RUN: KeyboardInterrupt, KVM_EXIT_INTR, and
    the guest's rip still on its loop."""
    if backend == "kvmlab.host" and host.available() is not None:
        pytest.skip(f"host /dev/kvm unusable: {host.available()}")
    out = subprocess.run(
        [sys.executable, "-c", CTRL_C, backend], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "KeyboardInterrupt 10 0x1000", out.stderr
