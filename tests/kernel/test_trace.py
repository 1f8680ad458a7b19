"""Golden call-path traces: each operation walks the functions Linux's does, in its order."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvmlab import sys as k
from kvmlab.kernel import fs, kvm_main, trace
from kvmlab.uapi import (
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_SREGS,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    kvm_regs,
    kvm_sregs,
    kvm_userspace_memory_region,
)


@pytest.fixture
def kvm_fd() -> Iterator[int]:
    fd = k.open("/dev/kvm", os.O_RDWR)
    yield fd
    k.close(fd)


def record(action):  # type: ignore[no-untyped-def]
    with trace.recording() as rec, contextlib.suppress(OSError):
        action()
    return rec


def test_create_vm_walks_kvm_dev_ioctl_to_anon_inode(kvm_fd: int) -> None:
    fds = []
    rec = record(lambda: fds.append(k.ioctl(kvm_fd, KVM_CREATE_VM, 0)))
    assert rec.calls() == [
        "kvm_dev_ioctl",
        "kvm_dev_ioctl_create_vm",
        "kvm_create_vm",
        "kvm_arch_init_vm",
        "anon_inode_getfd",
    ]
    assert f"<- kvm_dev_ioctl = {fds[0]:#x}" in rec.tree() or f"= {fds[0]}" in rec.tree()
    k.close(fds[0])


def test_create_vm_with_a_bad_type_fails_in_kvm_arch_init_vm(kvm_fd: int) -> None:
    rec = record(lambda: k.ioctl(kvm_fd, KVM_CREATE_VM, 1))
    assert rec.tree(notes=False).splitlines() == [
        "-> kvm_dev_ioctl(cmd=KVM_CREATE_VM, arg=1)",
        "  -> kvm_dev_ioctl_create_vm(type=1)",
        "    -> kvm_create_vm(type=1)",
        "      -> kvm_arch_init_vm(type=1)",
        "      <- kvm_arch_init_vm: EINVAL",
        "    <- kvm_create_vm: EINVAL",
        "  <- kvm_dev_ioctl_create_vm: EINVAL",
        "<- kvm_dev_ioctl: EINVAL",
    ]


CREATE_VCPU_PATH = [
    "kvm_vm_ioctl",
    "kvm_vm_ioctl_create_vcpu",
    "kvm_arch_vcpu_precreate",
    "kvm_arch_vcpu_create",
    "kvm_vcpu_reset",
    "kvm_arch_vcpu_ioctl_set_regs",
]


def test_create_vcpu_checks_then_takes_a_reference_and_makes_the_fd(kvm_fd: int) -> None:
    vm = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    rec = record(lambda: k.ioctl(vm, KVM_CREATE_VCPU, 0))
    assert rec.calls() == [*CREATE_VCPU_PATH, "kvm_get_kvm", "create_vcpu_fd", "anon_inode_getfd"]
    notes = [e.func for e in rec.events if e.kind == "note"]
    assert notes == [
        "id >= KVM_MAX_VCPU_IDS?",
        "created_vcpus >= max_vcpus?",
        "kvm_get_vcpu_by_id: is the id taken?",
        "users_count",
        "online_vcpus++",
    ]
    k.close(vm)


def test_create_vcpu_error_paths_fail_where_linux_does(kvm_fd: int) -> None:
    vm = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    too_big = record(lambda: k.ioctl(vm, KVM_CREATE_VCPU, 4096))
    assert too_big.calls() == ["kvm_vm_ioctl", "kvm_vm_ioctl_create_vcpu"]
    assert "<- kvm_vm_ioctl_create_vcpu: EINVAL" in too_big.tree()
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 7)
    k.close(vcpu)  # the vCPU stays: its id is still taken
    dup = record(lambda: k.ioctl(vm, KVM_CREATE_VCPU, 7))
    # the duplicate is found only after the vCPU was built, and is unwound
    assert dup.calls() == [*CREATE_VCPU_PATH, "kvm_arch_vcpu_destroy"]
    assert "<- kvm_vm_ioctl_create_vcpu: EEXIST" in dup.tree()
    kvm = fs.fdget(vm).private_data  # type: ignore[union-attr]
    kvm.max_vcpus = kvm.created_vcpus  # the vCPU limit, without creating 1024 vCPUs
    full = record(lambda: k.ioctl(vm, KVM_CREATE_VCPU, 8))
    assert full.calls() == ["kvm_vm_ioctl", "kvm_vm_ioctl_create_vcpu"]
    assert "<- kvm_vm_ioctl_create_vcpu: EINVAL" in full.tree()
    k.close(vm)


def test_memory_region_create_and_overlap_go_through_kvm_set_memory_region(kvm_fd: int) -> None:
    vm = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, 0x4000)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    create = record(
        lambda: k.ioctl(
            vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, 0x4000, hva)
        )
    )
    assert create.calls() == [
        "kvm_vm_ioctl",
        "kvm_vm_ioctl_set_memory_region",
        "__kvm_set_memory_region",
    ]
    assert "KVM_MR_CREATE" in [e.func for e in create.events]
    overlap = record(
        lambda: k.ioctl(
            vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(1, 0, 0x2000, 0x2000, hva)
        )
    )
    assert "<- __kvm_set_memory_region: EEXIST" in overlap.tree()
    k.close(vm)


def test_kvm_run_goes_through_vcpu_enter_guest_and_the_exit_handler(kvm_fd: int) -> None:
    vm = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    ram = mmap.mmap(-1, 0x10000)
    ram[0x1000:0x1003] = bytes([0xE6, 0x10, 0xF4])  # out 0x10, al ; hlt
    hva = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    k.ioctl(vm, KVM_SET_USER_MEMORY_REGION, kvm_userspace_memory_region(0, 0, 0, 0x10000, hva))
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 0)
    sregs = kvm_sregs()
    k.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs.cs.base = sregs.cs.selector = 0
    k.ioctl(vcpu, KVM_SET_SREGS, sregs)
    k.ioctl(vcpu, KVM_SET_REGS, kvm_regs(rip=0x1000, rflags=2))
    out = record(lambda: k.ioctl(vcpu, KVM_RUN, 0))
    assert out.calls() == [
        "kvm_vcpu_ioctl",
        "kvm_arch_vcpu_ioctl_run",
        "vcpu_run",
        "vcpu_enter_guest",
        "vmx_vcpu_run",
        "vmx_handle_exit",
        "handle_io",
        "post_kvm_run_save",
    ]
    hlt = record(lambda: k.ioctl(vcpu, KVM_RUN, 0))
    assert hlt.calls()[:3] == ["kvm_vcpu_ioctl", "kvm_arch_vcpu_ioctl_run", "complete_fast_pio_out"]
    assert "kvm_emulate_halt" in hlt.calls()
    assert k.stats(vcpu)["io_exits"] == 1 and k.stats(vcpu)["halt_exits"] == 1
    k.close(vcpu)
    k.close(vm)


MODULE_RELOAD = """
from kvmlab import sys as k
from kvmlab.kernel import trace
with trace.recording() as rec:
    k.rmmod()
    k.modprobe()
print(" ".join(rec.calls()))
"""


def test_module_load_registers_dev_kvm_last() -> None:
    # a fresh process: rmmod refuses (EBUSY) while any kvmlab fd is open, as rmmod does
    out = subprocess.run([sys.executable, "-c", MODULE_RELOAD], capture_output=True, text=True)
    assert out.stdout.split() == [
        "vmx_exit",
        "kvm_exit",
        "misc_deregister",
        "vmx_init",
        "kvm_x86_vendor_init",
        "vmx_hardware_setup",
        "kvm_init",
        "misc_register",
    ]


def test_tracing_off_leaves_the_plain_functions_in_place() -> None:
    plain = kvm_main.kvm_vcpu_ioctl
    with trace.recording():
        assert kvm_main.kvm_vcpu_ioctl is not plain
    assert kvm_main.kvm_vcpu_ioctl is plain
    assert not trace.active


def test_create_vcpu_from_another_process_stops_at_the_mm_check(kvm_fd: int) -> None:
    vm = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its mm is not the VM's
        rec = record(lambda: k.ioctl(vm, KVM_CREATE_VCPU, 0))
        os.write(write_end, rec.tree().encode())
        os._exit(0)
    os.close(write_end)
    tree = b""
    while chunk := os.read(read_end, 4096):
        tree += chunk
    os.waitpid(pid, 0)
    lines = tree.decode().splitlines()
    assert lines[0] == "-> kvm_vm_ioctl(cmd=KVM_CREATE_VCPU)"
    assert lines[1].strip().startswith("kvm->mm != current->mm")
    assert lines[2] == "<- kvm_vm_ioctl: EIO"
    k.close(vm)


def test_fd_names_are_the_hosts_anon_inode_names(kvm_fd: int) -> None:
    vm = k.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    vcpu = k.ioctl(vm, KVM_CREATE_VCPU, 3)
    names = k.fd_names()
    assert (names[kvm_fd], names[vm], names[vcpu]) == (
        "/dev/kvm",
        "anon_inode:kvm-vm",
        "anon_inode:kvm-vcpu:3",
    )
    k.close(vcpu)
    k.close(vm)


def test_a_recording_renders_as_json_and_a_table(kvm_fd: int) -> None:
    rec = record(lambda: k.ioctl(kvm_fd, KVM_CREATE_VM, 99))
    rows = rec.table()
    assert rows[0]["kind"] == "enter" and rows[0]["func"] == "kvm_dev_ioctl"
    assert '"errno": "EINVAL"' in rec.to_json()


FD_EXHAUSTED = """
import os, resource
from kvmlab import sys as k
from kvmlab.kernel import trace
from kvmlab.uapi import KVM_CREATE_VCPU, KVM_CREATE_VM
kvm = k.open("/dev/kvm", os.O_RDWR)
vm = k.ioctl(kvm, KVM_CREATE_VM, 0)
spare = os.dup(0)  # the lowest free descriptor: the limit goes just below it
os.close(spare)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (spare, hard))
with trace.recording() as rec:
    try:
        k.ioctl(vm, KVM_CREATE_VCPU, 0)
    except OSError as e:
        print("errno", e.errno)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(" ".join(rec.calls()))
print(rec.tree(notes=False).splitlines()[-1])
print("again", k.ioctl(vm, KVM_CREATE_VCPU, 0) > 0)
"""


def test_create_vcpu_fd_failure_unwinds_and_frees_the_id() -> None:
    # a fresh process whose descriptor limit leaves no room for the vCPU's fd (EMFILE)
    out = subprocess.run([sys.executable, "-c", FD_EXHAUSTED], capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "errno 24", out.stderr  # EMFILE
    assert lines[1].split() == [
        *CREATE_VCPU_PATH,
        "kvm_get_kvm",
        "create_vcpu_fd",
        "anon_inode_getfd",
        "kvm_arch_vcpu_destroy",
    ]
    assert lines[2] == "<- kvm_vm_ioctl: EMFILE"
    assert lines[3] == "again True"  # the id and the vCPU count were given back
