"""The architecture-neutral core of the simulated kvm module, after virt/kvm/kvm_main.c.

Three kinds of file, three ioctl entry points: `/dev/kvm` (kvm_dev_ioctl), a VM
(kvm_vm_ioctl) and a vCPU (kvm_vcpu_ioctl). Names, checks, their order and their errno follow
Linux 6.12 so that a walkthrough of the C source can be followed here line by line:
https://elixir.bootlin.com/linux/v6.12/source/virt/kvm/kvm_main.c
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvmlab.kernel import eventfd, fs, signals
from kvmlab.kernel.memslots import (
    KVM_ADDRESS_SPACE_NUM,
    KVM_USER_MEM_SLOTS,
    PAGE_SIZE,
    KvmMemslots,
    MemoryChange,
    set_memory_region,
)
from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import copy_struct_from_user, copy_to_user, fail
from kvmlab.uapi import (
    KVM_API_VERSION,
    KVM_CAP_CHECK_EXTENSION_VM,
    KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_CAP_INTERNAL_ERROR_DATA,
    KVM_CAP_IOEVENTFD,
    KVM_CAP_IOEVENTFD_ANY_LENGTH,
    KVM_CAP_IRQFD,
    KVM_CAP_JOIN_MEMORY_REGIONS_WORKS,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_USER_MEMORY,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_RUN,
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    ioctl_name,
    kvm_dirty_log,
    kvm_ioeventfd,
    kvm_irqfd,
    kvm_mp_state,
    kvm_userspace_memory_region,
)

KVM_MINOR = 232
_NO_MAPPING = mmap.mmap(-1, mmap.PAGESIZE)  # stands in until a vCPU's own pages are mapped


class KvmArch(Protocol):
    """The hooks an architecture (arch/x86/kvm, arch/arm64/kvm) gives the generic core."""

    name: str
    KVM_MAX_VCPUS: int
    KVM_MAX_VCPU_IDS: int
    KVM_VCPU_MMAP_PAGES: int
    kvm_run_type: type[ctypes.Structure]

    def kvm_arch_dev_ioctl(self, cmd: int, arg: int) -> int: ...
    def kvm_arch_init_vm(self, kvm: Kvm, type_: int) -> None: ...
    def kvm_arch_destroy_vm(self, kvm: Kvm) -> None: ...
    def kvm_vm_ioctl_check_extension(self, kvm: Kvm | None, cap: int) -> int: ...
    def kvm_arch_vm_ioctl(self, kvm: Kvm, cmd: int, arg: int) -> int: ...
    def kvm_arch_vcpu_precreate(self, kvm: Kvm, id_: int) -> None: ...
    def kvm_arch_vcpu_create(self, vcpu: KvmVcpu) -> None: ...
    def kvm_arch_vcpu_destroy(self, vcpu: KvmVcpu) -> None: ...
    def kvm_arch_vcpu_ioctl(self, vcpu: KvmVcpu, cmd: int, arg: int) -> int: ...
    def kvm_arch_vcpu_ioctl_run(self, vcpu: KvmVcpu) -> int: ...
    def kvm_arch_vcpu_ioctl_get_mpstate(self, vcpu: KvmVcpu) -> int: ...
    def kvm_arch_irqfd_allowed(self, kvm: Kvm) -> bool: ...
    def kvm_set_irq(self, kvm: Kvm, gsi: int, level: int) -> int: ...
    def kvm_register_irq_ack_notifier(
        self, kvm: Kvm, gsi: int, func: Callable[[], None]
    ) -> Any: ...
    def kvm_unregister_irq_ack_notifier(self, kvm: Kvm, notifier: Any) -> None: ...


class GuestLock:
    """One vCPU of a VM inside the guest at a time.

    Each vCPU has its own Unicorn engine, and a `lock`-prefixed instruction is atomic only
    within one engine, so vCPUs on shared memory take turns. A vCPU that waits longer than a
    slice kicks the one inside out of the guest (it re-enters at once, as after an interrupt):
    a guest spinning forever cannot starve the others.
    """

    SLICE = 0.01  # seconds

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: Any = None

    def acquire(self, vcpu: Any) -> None:
        while not self._lock.acquire(timeout=self.SLICE):
            holder = self.holder
            if holder is not None:
                holder.arch.hw.kick()
        self.holder = vcpu

    def release(self) -> None:
        self.holder = None
        self._lock.release()


class Kvm:
    """struct kvm: one virtual machine."""

    def __init__(self, arch: KvmArch, type_: int) -> None:
        self.arch_ops = arch
        self.type = type_
        self.mm = current_mm()  # kvm->mm: only the creating process may use the VM
        self.lock = threading.Lock()
        self.users_count = 1  # the VM file's reference
        self.vm_dead = False
        self.max_vcpus = arch.KVM_MAX_VCPUS
        self.created_vcpus = 0
        self.online_vcpus = 0
        self.vcpu_array: list[KvmVcpu] = []
        self.memslots = [KvmMemslots() for _ in range(KVM_ADDRESS_SPACE_NUM)]
        self.slots_lock = threading.Lock()
        self.guest_lock = GuestLock()
        self.arch: Any = None  # struct kvm_arch, filled by kvm_arch_init_vm
        self.irqfds: eventfd.KvmIrqfds
        self.ioeventfds: list[eventfd.Ioeventfd]
        self.buses: list[dict[int, tuple[eventfd.Ioeventfd, ...]]]  # by address
        eventfd.kvm_eventfd_init(self)

    def kvm_get_vcpu_by_id(self, id_: int) -> KvmVcpu | None:
        for vcpu in self.vcpu_array:
            if vcpu.vcpu_id == id_:
                return vcpu
        return None


@dataclass
class KvmVcpuStat:
    """struct kvm_vcpu_stat: what the host shows in debugfs and KVM_GET_STATS_FD."""

    exits: int = 0  # every return from the guest
    io_exits: int = 0
    mmio_exits: int = 0
    halt_exits: int = 0
    irq_window_exits: int = 0
    signal_exits: int = 0
    request_irq_exits: int = 0
    insn_emulation_fail: int = 0


class KvmVcpu:
    """struct kvm_vcpu: one virtual CPU and its shared `kvm_run` page."""

    def __init__(self, kvm: Kvm, id_: int) -> None:
        # kvm_vcpu_init
        self.kvm = kvm
        self.vcpu_id = id_
        self.vcpu_idx = -1
        self.mutex = threading.Lock()
        self.pid: int | None = None  # the thread of the last KVM_RUN
        self.run_map = _NO_MAPPING  # the kvm_run pages, mapped by create_vcpu_fd
        self.run: Any = None  # struct kvm_run over run_map
        self.arch: Any = None  # struct kvm_vcpu_arch
        self.stat = KvmVcpuStat()
        self.kicked = False  # signals.kvm_vcpu_kick: until a KVM_RUN returns EINTR for it


_current_pid = os.getpid()


def _forked() -> None:
    global _current_pid
    _current_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_mm() -> int:
    """current->mm: this process (cached: getpid is a system call on every ioctl otherwise)."""
    return _current_pid


def check_mm(kvm: Kvm) -> None:
    """The first check of every VM and vCPU ioctl: EIO from another process or a dead VM."""
    if kvm.mm != _current_pid or kvm.vm_dead:
        note("kvm->mm != current->mm: another process", mm=kvm.mm, current=_current_pid)
        fail(errno.EIO)


vm_list: list[Kvm] = []
_vm_list_lock = threading.Lock()
kvm_arch_ops: KvmArch | None = None


# --- reference counting ---------------------------------------------------------------------


@traced()
def kvm_get_kvm(kvm: Kvm) -> None:
    kvm.users_count += 1  # callers hold kvm->lock or own a reference already
    note("users_count", users_count=kvm.users_count)


@traced()
def kvm_put_kvm(kvm: Kvm) -> None:
    """Drop a reference; the last one destroys the VM."""
    with kvm.lock:
        kvm.users_count -= 1
        last = kvm.users_count == 0
    note("users_count", users_count=kvm.users_count)
    if last:
        kvm_destroy_vm(kvm)


@traced()
def kvm_destroy_vm(kvm: Kvm) -> None:
    """Take the VM off vm_list, destroy its vCPUs (kvm_arch_destroy_vm) and free its slots."""
    with _vm_list_lock:
        if kvm in vm_list:
            vm_list.remove(kvm)
    eventfd.kvm_eventfd_release(kvm)
    kvm.arch_ops.kvm_arch_destroy_vm(kvm)
    for vcpu in kvm.vcpu_array:
        kvm_vcpu_destroy(vcpu)
    kvm.vcpu_array.clear()
    for slots in kvm.memslots:
        slots.slots.clear()


def kvm_vcpu_destroy(vcpu: KvmVcpu) -> None:
    vcpu.kvm.arch_ops.kvm_arch_vcpu_destroy(vcpu)
    vcpu.run = None
    if vcpu.run_map is not _NO_MAPPING:
        # A view of kvm_run may still be alive (a traceback's frame, say); then the mapping
        # goes when that view does, as the kernel frees a page when its last map goes.
        with contextlib.suppress(BufferError):
            vcpu.run_map.close()


# --- /dev/kvm ---------------------------------------------------------------------------------


class KvmChardevOps:
    """kvm_chardev_ops: the file operations of /dev/kvm itself."""

    name = "kvm"

    def unlocked_ioctl(self, file: fs.File, cmd: int, arg: int) -> int:
        return int_return(kvm_dev_ioctl(cmd, arg))

    def mmap(self, file: fs.File, length: int, offset: int) -> None:
        fail(errno.ENODEV)

    def release(self, file: fs.File) -> None:
        pass  # /dev/kvm keeps no per-open state


def int_return(r: int) -> int:
    """KVM's ioctl handlers keep their result in an `int r`: userspace gets it sign-extended
    (KVM_GET_TSC_KHZ of 2**31 kHz or more reads negative, as on the host)."""
    return (r + 2**31) % 2**32 - 2**31


def _arch() -> KvmArch:
    if kvm_arch_ops is None:
        fail(errno.ENODEV)
    return kvm_arch_ops


@traced(args=lambda cmd, arg: {"cmd": ioctl_name(cmd), "arg": arg})
def kvm_dev_ioctl(cmd: int, arg: int) -> int:
    """The ioctls of /dev/kvm: API version, VM creation, capabilities, the vCPU mmap size."""
    arch = _arch()
    if cmd == KVM_GET_API_VERSION:
        if arg:
            fail(errno.EINVAL)
        return KVM_API_VERSION
    if cmd == KVM_CREATE_VM:
        return kvm_dev_ioctl_create_vm(arg)
    if cmd == KVM_CHECK_EXTENSION:
        return kvm_vm_ioctl_check_extension_generic(None, arg)
    if cmd == KVM_GET_VCPU_MMAP_SIZE:
        if arg:
            fail(errno.EINVAL)
        return arch.KVM_VCPU_MMAP_PAGES * PAGE_SIZE
    return arch.kvm_arch_dev_ioctl(cmd, arg)


@traced(args=lambda type_: {"type": type_})
def kvm_dev_ioctl_create_vm(type_: int) -> int:
    kvm = kvm_create_vm(type_)
    return fs.anon_inode_getfd("kvm-vm", KVM_VM_FOPS, kvm)


@traced(args=lambda type_: {"type": type_})
def kvm_create_vm(type_: int) -> Kvm:
    """Allocate a VM owned by this process, let the arch check `type_`, add it to vm_list."""
    arch = _arch()
    kvm = Kvm(arch, type_)
    arch.kvm_arch_init_vm(kvm, type_)
    with _vm_list_lock:
        vm_list.append(kvm)
    return kvm


@traced(args=lambda kvm, cap: {"cap": cap})
def kvm_vm_ioctl_check_extension_generic(kvm: Kvm | None, cap: int) -> int:
    """KVM_CHECK_EXTENSION: generic capabilities here, the rest from the arch; unknown → 0.

    KVM_CAP_IOEVENTFD is in every architecture's own list in Linux; kvmlab answers it here once.
    """
    if cap in (
        KVM_CAP_USER_MEMORY,
        KVM_CAP_DESTROY_MEMORY_REGION_WORKS,
        KVM_CAP_JOIN_MEMORY_REGIONS_WORKS,
        KVM_CAP_INTERNAL_ERROR_DATA,
        KVM_CAP_IRQFD,
        KVM_CAP_IOEVENTFD,
        KVM_CAP_IOEVENTFD_ANY_LENGTH,
        KVM_CAP_CHECK_EXTENSION_VM,
        KVM_CAP_IMMEDIATE_EXIT,
    ):
        return 1
    if cap == KVM_CAP_NR_MEMSLOTS:
        return KVM_USER_MEM_SLOTS
    return _arch().kvm_vm_ioctl_check_extension(kvm, cap)


# --- VM file -------------------------------------------------------------------------------------


class KvmVmFops:
    """kvm_vm_fops."""

    name = "kvm-vm"

    def unlocked_ioctl(self, file: fs.File, cmd: int, arg: int) -> int:
        return int_return(kvm_vm_ioctl(file.private_data, cmd, arg))

    def mmap(self, file: fs.File, length: int, offset: int) -> None:
        fail(errno.ENODEV)

    def release(self, file: fs.File) -> None:
        """kvm_vm_release: the irqfds go now; the VM lives on while vCPU files hold it."""
        eventfd.kvm_irqfd_release(file.private_data)
        kvm_put_kvm(file.private_data)


@traced(args=lambda kvm, cmd, arg: {"cmd": ioctl_name(cmd)})
def kvm_vm_ioctl(kvm: Kvm, cmd: int, arg: int) -> int:
    """The ioctls of a VM fd; anything unknown goes to kvm_arch_vm_ioctl (ENOTTY on x86)."""
    check_mm(kvm)
    if cmd == KVM_CREATE_VCPU:
        return kvm_vm_ioctl_create_vcpu(kvm, arg)
    if cmd == KVM_SET_USER_MEMORY_REGION:
        mem = copy_struct_from_user(kvm_userspace_memory_region, arg)
        kvm_vm_ioctl_set_memory_region(kvm, mem)
        return 0
    if cmd == KVM_GET_DIRTY_LOG:
        kvm_vm_ioctl_get_dirty_log(kvm, copy_struct_from_user(kvm_dirty_log, arg))
        return 0
    if cmd == KVM_CHECK_EXTENSION:
        return kvm_vm_ioctl_check_extension_generic(kvm, arg)
    if cmd == KVM_IOEVENTFD:
        return eventfd.kvm_ioeventfd(kvm, copy_struct_from_user(kvm_ioeventfd, arg))
    if cmd == KVM_IRQFD:
        return eventfd.kvm_irqfd(kvm, copy_struct_from_user(kvm_irqfd, arg))
    return kvm.arch_ops.kvm_arch_vm_ioctl(kvm, cmd, arg)


@traced(args=lambda kvm, log: {"slot": log.slot})
def kvm_vm_ioctl_get_dirty_log(kvm: Kvm, log: kvm_dirty_log) -> None:
    """kvm_get_dirty_log_protect: hand out the slot's dirty bitmap, clear it, re-protect.

    The bitmap has one bit per page of the slot, rounded up to 64 bits; pages the guest (not
    userspace) wrote since the last call are set. The vCPUs write-protect the slot again at
    their next entry, as KVM write-protects it here.
    """
    as_id, id_ = log.slot >> 16, log.slot & 0xFFFF
    if as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= KVM_USER_MEM_SLOTS:
        fail(errno.EINVAL)
    with kvm.slots_lock:
        slots = kvm.memslots[as_id]
        slot = slots.slots.get(id_)
        if slot is None or slot.dirty_bitmap is None:
            fail(errno.ENOENT)
        copy_to_user(log.dirty_bitmap, slot.dirty_bitmap)
        slot.dirty_bitmap[:] = bytes(len(slot.dirty_bitmap))
        slots.generation += 1


@traced(
    args=lambda kvm, mem: {"slot": mem.slot, "gpa": mem.guest_phys_addr, "size": mem.memory_size}
)
def kvm_vm_ioctl_set_memory_region(kvm: Kvm, mem: kvm_userspace_memory_region) -> None:
    if mem.slot & 0xFFFF >= KVM_USER_MEM_SLOTS:
        fail(errno.EINVAL)
    with kvm.slots_lock:  # kvm_set_memory_region
        change = set_memory_region(kvm.memslots, mem)
    if change in (MemoryChange.DELETE, MemoryChange.MOVE):
        kvm_swap_active_memslots(kvm)


SYNCHRONIZE_TIMEOUT = 1.0  # seconds; a vCPU always leaves the guest sooner once kicked


@traced()
def kvm_swap_active_memslots(kvm: Kvm) -> None:
    """After a slot went away or moved: no vCPU may still reach its old memory.

    KVM zaps the slot's mappings and waits out every vCPU inside the guest
    (synchronize_srcu), so the program may unmap the memory as soon as the ioctl returns.
    Here each vCPU is kicked (it re-enters with the new slots) and waited for.
    """
    vcpus = list(kvm.vcpu_array)
    for vcpu in vcpus:
        vcpu.arch.hw.kick()  # stays requested: one not in the guest yet re-checks at entry
    deadline = time.monotonic() + SYNCHRONIZE_TIMEOUT
    for vcpu in vcpus:
        while vcpu.arch.hw.running and time.monotonic() < deadline:
            time.sleep(0.0001)


@traced(args=lambda kvm, id_: {"id": id_})
def kvm_vm_ioctl_create_vcpu(kvm: Kvm, id_: int) -> int:
    """KVM_CREATE_VCPU, check by check: the id, the vCPU limit, duplicates; then the fd."""
    arch = kvm.arch_ops
    note("id >= KVM_MAX_VCPU_IDS?", id=id_, KVM_MAX_VCPU_IDS=arch.KVM_MAX_VCPU_IDS)
    if id_ >= arch.KVM_MAX_VCPU_IDS:
        fail(errno.EINVAL)
    with kvm.lock:
        note("created_vcpus >= max_vcpus?", created_vcpus=kvm.created_vcpus)
        if kvm.created_vcpus >= kvm.max_vcpus:
            fail(errno.EINVAL)
        arch.kvm_arch_vcpu_precreate(kvm, id_)
        kvm.created_vcpus += 1
    try:
        vcpu = KvmVcpu(kvm, id_)  # kvm_vcpu_init
        arch.kvm_arch_vcpu_create(vcpu)
        try:
            with kvm.lock:
                note("kvm_get_vcpu_by_id: is the id taken?", id=id_)
                if kvm.kvm_get_vcpu_by_id(id_) is not None:
                    fail(errno.EEXIST)
                vcpu.vcpu_idx = kvm.online_vcpus
                kvm.vcpu_array.append(vcpu)
                kvm_get_kvm(kvm)
                try:
                    fd = create_vcpu_fd(vcpu)
                except BaseException:
                    kvm.users_count -= 1  # kvm_put_kvm_no_destroy
                    kvm.vcpu_array.remove(vcpu)
                    raise
                kvm.online_vcpus += 1
                note("online_vcpus++", online_vcpus=kvm.online_vcpus)
        except BaseException:
            arch.kvm_arch_vcpu_destroy(vcpu)
            raise
    except BaseException:
        with kvm.lock:
            kvm.created_vcpus -= 1
        raise
    return fd


@traced(args=lambda vcpu: {"name": f"kvm-vcpu:{vcpu.vcpu_id}"})
def create_vcpu_fd(vcpu: KvmVcpu) -> int:
    """anon_inode_getfd("kvm-vcpu:N"): its memfd holds the kvm_run page and the PIO page."""
    arch = vcpu.kvm.arch_ops
    size = arch.KVM_VCPU_MMAP_PAGES * PAGE_SIZE
    fd = fs.anon_inode_getfd(f"kvm-vcpu:{vcpu.vcpu_id}", KVM_VCPU_FOPS, vcpu, size)
    vcpu.run_map = mmap.mmap(fd, size)
    vcpu.run = arch.kvm_run_type.from_buffer(vcpu.run_map)
    return fd


# --- vCPU file -----------------------------------------------------------------------------------


class KvmVcpuFops:
    """kvm_vcpu_fops: ioctl, mmap of the kvm_run pages, release."""

    name = "kvm-vcpu"

    def unlocked_ioctl(self, file: fs.File, cmd: int, arg: int) -> int:
        return int_return(kvm_vcpu_ioctl(file.private_data, cmd, arg))

    def mmap(self, file: fs.File, length: int, offset: int) -> None:
        """kvm_vcpu_mmap: only the vCPU's own pages (kvm_run, PIO data, ...) can be mapped.

        The host maps a longer range and raises SIGBUS when the extra page is touched; kvmlab
        refuses it with EINVAL instead, so a mistake never kills the interpreter.
        """
        vcpu: KvmVcpu = file.private_data
        if offset % PAGE_SIZE or length <= 0:
            fail(errno.EINVAL)
        if offset + length > vcpu.kvm.arch_ops.KVM_VCPU_MMAP_PAGES * PAGE_SIZE:
            fail(errno.EINVAL)

    def release(self, file: fs.File) -> None:
        """kvm_vcpu_release: only a reference on the VM goes; the vCPU itself stays."""
        kvm_put_kvm(file.private_data.kvm)


@traced(args=lambda vcpu, cmd, arg: {"vcpu": vcpu.vcpu_id, "cmd": ioctl_name(cmd)})
def kvm_vcpu_ioctl(vcpu: KvmVcpu, cmd: int, arg: int) -> int:
    """The ioctls of a vCPU fd, under vcpu->mutex; unknown ones are EINVAL."""
    kvm = vcpu.kvm
    check_mm(kvm)
    if (cmd >> 8) & 0xFF != KVMIO:  # _IOC_TYPE(cmd)
        fail(errno.EINVAL)
    with vcpu.mutex:
        if cmd == KVM_RUN:
            if arg:
                fail(errno.EINVAL)
            if vcpu.pid != threading.get_ident():  # kvm_arch_vcpu_run_pid_change
                note("vcpu->pid changes", thread=threading.current_thread().name)
                run_pid_change = getattr(kvm.arch_ops, "kvm_arch_vcpu_run_pid_change", None)
                if run_pid_change is not None:  # arm64: ENOEXEC before KVM_ARM_VCPU_INIT
                    run_pid_change(vcpu)
                vcpu.pid = threading.get_ident()
            signals.enter_kvm_run(vcpu)
            try:
                return kvm.arch_ops.kvm_arch_vcpu_ioctl_run(vcpu)
            finally:
                signals.leave_kvm_run(vcpu)
        if cmd == KVM_GET_MP_STATE:
            state = kvm_mp_state(kvm.arch_ops.kvm_arch_vcpu_ioctl_get_mpstate(vcpu))
            copy_to_user(arg, state)
            return 0
        return kvm.arch_ops.kvm_arch_vcpu_ioctl(vcpu, cmd, arg)


KVM_VM_FOPS = KvmVmFops()
KVM_VCPU_FOPS = KvmVcpuFops()
KVM_CHARDEV_OPS = KvmChardevOps()
kvm_dev = fs.MiscDevice(KVM_MINOR, "kvm", KVM_CHARDEV_OPS)


@traced()
def kvm_init(arch: KvmArch) -> None:
    """Module load: install the arch's ops, then misc_register(&kvm_dev) — /dev/kvm appears last."""
    global kvm_arch_ops
    kvm_arch_ops = arch
    fs.misc_register(kvm_dev)


@traced()
def kvm_exit() -> None:
    """Module unload: /dev/kvm disappears first."""
    global kvm_arch_ops
    fs.misc_deregister(kvm_dev)
    kvm_arch_ops = None
