"""irqfd and ioeventfd, after virt/kvm/eventfd.c: eventfds as interrupt lines and as doorbells.

KVM_IRQFD ties an eventfd to a GSI: each signal of the eventfd raises and lowers that GSI
(irqfd_inject), so another thread, or vhost in the host kernel, interrupts the guest without a
KVM ioctl. KVM_IOEVENTFD goes the other way: a guest write that matches an address (a port on
the PIO bus, a guest physical address on the MMIO bus), and optionally a value, signals an
eventfd instead of exiting to userspace, so a virtio doorbell costs no return from KVM_RUN.
https://elixir.bootlin.com/linux/v6.12/source/virt/kvm/eventfd.c

What stands in for the kernel's pieces here:
- KVM puts irqfd_wakeup on the eventfd's wait queue. kvmlab has one watcher thread per VM in
  epoll_wait over the eventfd of every irqfd; the epoll item is that wait-queue entry. Like
  KVM's, it lives as long as the eventfd's file: closing one fd of several leaves the irqfd
  working, and when the last one goes the item goes with the file (KVM gets EPOLLHUP and
  drops the irqfd; kvmlab drops its record at the next KVM_IRQFD).
- An eventfd_ctx is identified by the `eventfd-id` that /proc/self/fdinfo shows for it.
- An ioeventfd holds its eventfd (KVM: the eventfd_ctx) until it is deassigned or the VM goes;
  kvmlab holds a private dup of the eventfd's fd for that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import platform
import re
import select
import threading
from dataclasses import dataclass, field
from typing import Any

from kvmlab.kernel.trace import note, traced
from kvmlab.kernel.uaccess import fail
from kvmlab.uapi import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IOEVENTFD_VALID_FLAG_MASK,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_IRQFD_FLAG_RESAMPLE,
)
from kvmlab.uapi import kvm as kvm_h  # struct kvm_irqfd and kvm_ioeventfd (<linux/kvm.h>)

# enum kvm_bus (include/linux/kvm_host.h). KVM also puts a length-0 MMIO ioeventfd on
# KVM_FAST_MMIO_BUS for VMX's EPT-misconfig shortcut; kvmlab's MMIO stores all come through
# KVM_MMIO_BUS, so that copy is not kept.
KVM_MMIO_BUS, KVM_PIO_BUS, KVM_VIRTIO_CCW_NOTIFY_BUS = 0, 1, 2
KVM_NR_BUSES = 3
# <linux/kvm.h> values that kvmlab.uapi does not carry yet
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 1 << 3

WATCH_BOUND = 1.0  # seconds: the watcher's epoll_wait never blocks longer than this
STOP_BOUND = 5.0  # seconds: how long VM release waits for the watcher to finish an injection


# --- eventfds, seen from the process: what eventfd_ctx_fdget and eventfd_signal do ------------


@dataclass(frozen=True)
class EventfdCtx:
    """What KVM learns from eventfd_ctx_fdget: which eventfd it is, and its counter then."""

    id: int
    count: int


_FDINFO_FIELD = re.compile(rb"^eventfd-(id|count):\s*([0-9a-fA-F]+)$", re.M)


def eventfd_ctx_fdget(fd: int) -> EventfdCtx:
    """The eventfd behind `fd`: EBADF if no file is open there, EINVAL if it is no eventfd."""
    if fd < 0:
        fail(errno.EBADF)
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            text = f.read()
    except FileNotFoundError:
        fail(errno.EBADF)
    fields = dict(_FDINFO_FIELD.findall(text))
    if b"id" not in fields or b"count" not in fields:
        fail(errno.EINVAL)  # eventfd_ctx_fileget: f_op is not eventfd_fops
    return EventfdCtx(int(fields[b"id"]), int(fields[b"count"], 16))


def user_fd(value: int) -> int:
    """An fd field of a uapi struct as the kernel's `int fd` sees it (0xffffffff is -1)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def eventfd_dup(fd: int, eventfd_id: int) -> int | None:
    """A new fd on the eventfd `eventfd_id` if `fd` still names it, else None."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        if eventfd_ctx_fdget(dup).id == eventfd_id:
            return dup
    except OSError:
        pass
    os.close(dup)
    return None


def eventfd_find(fd: int, eventfd_id: int) -> int | None:
    """A new fd on the eventfd: through `fd` if it still names it, else through any fd of the
    process that does (the one it was assigned through may be closed while others live)."""
    dup = eventfd_dup(fd, eventfd_id)
    if dup is not None:
        return dup
    for name in os.listdir("/proc/self/fd"):
        dup = eventfd_dup(int(name), eventfd_id)
        if dup is not None:
            return dup
    return None  # only other processes hold it


def eventfd_signal(fd: int) -> None:
    """Add 1 to the counter without ever blocking (a full counter stays full, as in KVM)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if poller.poll(0):
        os.eventfd_write(fd, 1)


def eventfd_ctx_do_read(fd: int) -> int:
    """Take the counter (it reads 0 after), without blocking when it is already 0."""
    buf = bytearray(8)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:  # kernels before 5.12 have no RWF_NOWAIT reads on an eventfd
        if e.errno != errno.EOPNOTSUPP:
            raise
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return os.eventfd_read(fd) if poller.poll(0) else 0
    return int.from_bytes(buf, "little")


# --- epoll with a 64-bit token per item (select.epoll only stores the fd number) ------------


class EpollEvent(ctypes.Structure):
    """struct epoll_event; <sys/epoll.h> packs it on x86_64."""

    if platform.machine() == "x86_64":
        _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.epoll_create1.argtypes = [ctypes.c_int]
_libc.epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(EpollEvent)]
_libc.epoll_wait.argtypes = [ctypes.c_int, ctypes.POINTER(EpollEvent), ctypes.c_int, ctypes.c_int]
EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
_EPOLL_DATA = re.compile(rb"^tfd:.*\bdata:\s*([0-9a-fA-F]+)", re.M)


def _check(r: int) -> int:
    if r < 0:
        fail(ctypes.get_errno())
    return r


def epoll_ctl(epfd: int, op: int, fd: int, token: int = 0) -> None:
    event = EpollEvent(select.EPOLLIN | select.EPOLLET, token)
    _check(_libc.epoll_ctl(epfd, op, fd, ctypes.byref(event)))


def epoll_tokens(epfd: int) -> set[int]:
    """The tokens of the items still in the epoll set: an item leaves with its file."""
    with open(f"/proc/self/fdinfo/{epfd}", "rb") as f:
        return {int(token, 16) for token in _EPOLL_DATA.findall(f.read())}


# --- irqfd ------------------------------------------------------------------------------------


@dataclass(eq=False)
class KvmKernelIrqfd:
    """struct kvm_kernel_irqfd: one eventfd bound to one GSI."""

    kvm: Any
    gsi: int
    fd: int  # the fd it was assigned through: with the file, the key of its epoll item
    eventfd_id: int
    token: int  # its epoll item's data
    pending: bool  # the eventfd was signalled before KVM_IRQFD: injected once, counter kept
    resampler: KvmKernelIrqfdResampler | None = None  # a RESAMPLE irqfd's
    resamplefd: int = -1  # ... and its hold on the resample eventfd (a dup)


@dataclass(eq=False)
class KvmKernelIrqfdResampler:
    """struct kvm_kernel_irqfd_resampler: the RESAMPLE irqfds of one GSI and the ack notifier
    that lowers the line and signals their resamplefds at the guest's EOI."""

    kvm: Any
    gsi: int
    irqfds: list[KvmKernelIrqfd] = field(default_factory=list)
    notifier: Any = None


class IrqfdWatcher:
    """The thread that plays irqfd_wakeup for one VM: it waits on every irqfd's eventfd."""

    WAKE = 0  # the token of its own wake-up eventfd (stop)

    def __init__(self, irqfds: KvmIrqfds) -> None:
        self.irqfds = irqfds
        self.epfd = _check(_libc.epoll_create1(select.EPOLL_CLOEXEC))
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wake, self.WAKE)
        self.fd_lock = threading.Lock()  # epfd and wake are closed under it, once
        self.closed = self.stopping = False
        self.thread = threading.Thread(target=self.run, name="kvm-irqfd", daemon=True)
        self.thread.start()

    def run(self) -> None:
        events = (EpollEvent * 64)()
        try:
            while not self.stopping:
                n = _libc.epoll_wait(self.epfd, events, len(events), int(WATCH_BOUND * 1000))
                if n < 0 and ctypes.get_errno() != errno.EINTR:
                    _check(n)
                for event in events[: max(n, 0)]:
                    if event.data != self.WAKE:
                        irqfd_wakeup(self.irqfds, event.data)
        finally:
            with self.fd_lock:
                self.closed = True
                os.close(self.epfd)
                os.close(self.wake)

    def _epfd(self) -> int:
        """The epoll fd, while the thread lives (its number may be reused after)."""
        if self.closed:
            fail(errno.EBADF)
        return self.epfd

    def add(self, irqfd: KvmKernelIrqfd) -> None:
        """Watch the irqfd's eventfd (a signal still pending is reported at once)."""
        with self.fd_lock:
            try:
                epoll_ctl(self._epfd(), EPOLL_CTL_ADD, irqfd.fd, irqfd.token)
            except FileExistsError:  # an item left by a deassign that could not name the file
                epoll_ctl(self.epfd, EPOLL_CTL_MOD, irqfd.fd, irqfd.token)

    def remove(self, irqfd: KvmKernelIrqfd) -> None:
        """Take the irqfd's item out of the set, if its fd still names its eventfd."""
        dup = eventfd_dup(irqfd.fd, irqfd.eventfd_id)
        if dup is None:
            return  # the item stays until its file goes; its events find no irqfd
        os.close(dup)
        with self.fd_lock, contextlib.suppress(OSError):  # re-pointed meanwhile: as above
            epoll_ctl(self._epfd(), EPOLL_CTL_DEL, irqfd.fd)

    def live_tokens(self) -> set[int]:
        with self.fd_lock:
            return epoll_tokens(self._epfd())

    def stop(self) -> None:
        """End the thread: wake it, and wait (bounded) for an injection it is making."""
        with self.fd_lock:
            self.stopping = True
            if not self.closed:
                os.eventfd_write(self.wake, 1)
        if self.thread is not threading.current_thread():
            self.thread.join(STOP_BOUND)


@dataclass(eq=False)
class KvmIrqfds:
    """kvm->irqfds: the VM's irqfds, their lock, and the watcher (started by the first one)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    items: dict[int, KvmKernelIrqfd] = field(default_factory=dict)
    watcher: IrqfdWatcher | None = None
    tokens: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    resamplers: dict[int, KvmKernelIrqfdResampler] = field(default_factory=dict)  # by GSI


@traced(args=lambda irqfd: {"gsi": irqfd.gsi})
def irqfd_inject(irqfd: KvmKernelIrqfd) -> None:
    """The eventfd was signalled: an edge on the GSI, raised and lowered at once; a RESAMPLE
    irqfd's line stays high until the guest's EOI (a level-triggered device)."""
    kvm = irqfd.kvm
    kvm.arch_ops.kvm_set_irq(kvm, irqfd.gsi, 1)
    if irqfd.resampler is None:
        kvm.arch_ops.kvm_set_irq(kvm, irqfd.gsi, 0)


@traced(args=lambda resampler: {"gsi": resampler.gsi})
def irqfd_resampler_ack(resampler: KvmKernelIrqfdResampler) -> None:
    """The guest acknowledged the GSI: lower the line and tell every resamplefd, so the
    device (userspace) can check whether it still needs service and signal again."""
    kvm = resampler.kvm
    kvm.arch_ops.kvm_set_irq(kvm, resampler.gsi, 0)
    for irqfd in list(resampler.irqfds):
        eventfd_signal(irqfd.resamplefd)


def irqfd_resampler_get(kvm: Any, irqfds: KvmIrqfds, irqfd: KvmKernelIrqfd) -> None:
    """Join the GSI's resampler, making it (and its ack notifier) for the first. Holds
    irqfds.lock."""
    resampler = irqfds.resamplers.get(irqfd.gsi)
    if resampler is None:
        resampler = KvmKernelIrqfdResampler(kvm, irqfd.gsi)
        ack = resampler  # bound now: the notifier outlives this frame
        resampler.notifier = kvm.arch_ops.kvm_register_irq_ack_notifier(
            kvm, irqfd.gsi, lambda: irqfd_resampler_ack(ack)
        )
        irqfds.resamplers[irqfd.gsi] = resampler
    resampler.irqfds.append(irqfd)
    irqfd.resampler = resampler


def irqfd_resampler_shutdown(irqfds: KvmIrqfds, irqfd: KvmKernelIrqfd) -> None:
    """Leave the resampler; the last one out unregisters it and lowers the line. Holds
    irqfds.lock."""
    resampler = irqfd.resampler
    if resampler is None:
        return
    resampler.irqfds.remove(irqfd)
    os.close(irqfd.resamplefd)
    irqfd.resampler, irqfd.resamplefd = None, -1
    if not resampler.irqfds:
        kvm = resampler.kvm
        kvm.arch_ops.kvm_unregister_irq_ack_notifier(kvm, resampler.notifier)
        kvm.arch_ops.kvm_set_irq(kvm, resampler.gsi, 0)
        del irqfds.resamplers[resampler.gsi]


def irqfd_shutdown(irqfds: KvmIrqfds, irqfd: KvmKernelIrqfd) -> None:
    """Forget an irqfd (irqfd_deactivate and irqfd_shutdown). Holds irqfds.lock."""
    del irqfds.items[irqfd.token]
    irqfd_resampler_shutdown(irqfds, irqfd)


@traced(args=lambda irqfds, token: {"token": token})
def irqfd_wakeup(irqfds: KvmIrqfds, token: int) -> None:
    """An irqfd's eventfd was signalled: take its counter (KVM reads it) and inject.

    Runs under irqfds.lock, so that once a deassign returns its irqfd injects no more.
    """
    with irqfds.lock:
        irqfd = irqfds.items.get(token)
        if irqfd is None:
            return  # deassigned meanwhile
        if irqfd.pending:
            irqfd.pending = False  # KVM_IRQFD saw the signal and injected without a read
        else:
            dup = eventfd_find(irqfd.fd, irqfd.eventfd_id)
            if dup is not None:
                try:
                    note("eventfd_ctx_do_read", count=eventfd_ctx_do_read(dup))
                finally:
                    os.close(dup)
        irqfd_inject(irqfd)


def irqfd_prune(irqfds: KvmIrqfds) -> None:
    """Drop the irqfds whose eventfd is gone (KVM drops them on EPOLLHUP). Holds irqfds.lock."""
    if irqfds.watcher is None:
        return
    live = irqfds.watcher.live_tokens()
    for token in [t for t in irqfds.items if t not in live]:
        note("the eventfd's last fd was closed: irqfd gone", gsi=irqfds.items[token].gsi)
        irqfd_shutdown(irqfds, irqfds.items[token])


@traced(args=lambda kvm, args: {"fd": user_fd(args.fd), "gsi": args.gsi, "flags": args.flags})
def kvm_irqfd_assign(kvm: Any, args: kvm_h.kvm_irqfd) -> int:
    """Bind an eventfd to a GSI, checks in KVM's order: the irqchip, the fds, the eventfd free."""
    arch = kvm.arch_ops
    intc_initialized = getattr(arch, "kvm_arch_intc_initialized", None)  # weak: true
    if intc_initialized is not None and not intc_initialized(kvm):
        note("the interrupt controller is not initialized")
        fail(errno.EAGAIN)
    if not arch.kvm_arch_irqfd_allowed(kvm):
        note("no in-kernel irqchip: nothing for the GSI to reach")
        fail(errno.EINVAL)
    fd = user_fd(args.fd)
    ctx = eventfd_ctx_fdget(fd)
    resample = bool(args.flags & KVM_IRQFD_FLAG_RESAMPLE)
    resample_fd = user_fd(args.resamplefd)
    resample_id = eventfd_ctx_fdget(resample_fd).id if resample else 0
    irqfds: KvmIrqfds = kvm.irqfds
    with irqfds.lock:
        irqfd_prune(irqfds)
        if any(other.eventfd_id == ctx.id for other in irqfds.items.values()):
            note("this eventfd already drives a GSI")
            fail(errno.EBUSY)
        irqfd = KvmKernelIrqfd(kvm, args.gsi, fd, ctx.id, next(irqfds.tokens), ctx.count > 0)
        if resample:
            hold = eventfd_dup(resample_fd, resample_id)
            if hold is None:
                fail(errno.EBADF)  # closed between the check and here
            irqfd.resamplefd = hold
            irqfd_resampler_get(kvm, irqfds, irqfd)
        if irqfds.watcher is None:
            irqfds.watcher = IrqfdWatcher(irqfds)
        irqfds.watcher.add(irqfd)
        irqfds.items[irqfd.token] = irqfd
    return 0


def kvm_irqfd_deassign(kvm: Any, args: kvm_h.kvm_irqfd) -> int:
    """Unbind the eventfd from the GSI: 0 even if it was not bound (EBADF/EINVAL for the fd)."""
    ctx = eventfd_ctx_fdget(user_fd(args.fd))
    irqfds: KvmIrqfds = kvm.irqfds
    with irqfds.lock:
        irqfd_prune(irqfds)
        for irqfd in list(irqfds.items.values()):
            if irqfd.eventfd_id == ctx.id and irqfd.gsi == args.gsi:
                irqfd_shutdown(irqfds, irqfd)  # irqfd_deactivate
                if irqfds.watcher is not None:
                    irqfds.watcher.remove(irqfd)
    return 0


@traced(args=lambda kvm, args: {"gsi": args.gsi, "flags": args.flags})
def kvm_irqfd(kvm: Any, args: kvm_h.kvm_irqfd) -> int:
    """KVM_IRQFD: EINVAL for unknown flags, then DEASSIGN or assign."""
    if args.flags & ~(KVM_IRQFD_FLAG_DEASSIGN | KVM_IRQFD_FLAG_RESAMPLE):
        fail(errno.EINVAL)
    if args.flags & KVM_IRQFD_FLAG_DEASSIGN:
        return kvm_irqfd_deassign(kvm, args)
    return kvm_irqfd_assign(kvm, args)


def kvm_irqfd_release(kvm: Any) -> None:
    """The VM file is released: every irqfd goes and the watcher thread ends (KVM holds no VM
    reference for its irqfds, so they stop here even while vCPU fds keep the VM)."""
    irqfds: KvmIrqfds = kvm.irqfds
    with irqfds.lock:
        for irqfd in list(irqfds.items.values()):
            irqfd_shutdown(irqfds, irqfd)
        watcher, irqfds.watcher = irqfds.watcher, None
    if watcher is not None:
        watcher.stop()


def kvm_arch_irqfd_allowed(kvm: Any) -> bool:
    """The generic answer (a weak function in eventfd.c), for architectures that keep it."""
    return True


# --- ioeventfd --------------------------------------------------------------------------------


@dataclass(eq=False)
class Ioeventfd:
    """struct _ioeventfd: a guest write to `addr` on a bus that signals an eventfd."""

    bus_idx: int
    addr: int
    length: int  # 0: any length
    eventfd_id: int
    fd: int  # kvmlab's own dup of the eventfd: the reference KVM holds
    datamatch: int
    wildcard: bool  # no DATAMATCH: any value
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False


def ioeventfd_in_range(p: Ioeventfd, addr: int, data: bytes) -> bool:
    """The exact address; then the length, unless 0; then the value, unless a wildcard."""
    if addr != p.addr:
        return False
    if not p.length:
        return True
    if len(data) != p.length:
        return False
    return p.wildcard or int.from_bytes(data, "little") == p.datamatch


@traced(args=lambda p, addr, data: {"addr": addr, "len": len(data)})
def ioeventfd_write(p: Ioeventfd, addr: int, data: bytes) -> bool:
    """A guest write reached this ioeventfd's address: signal the eventfd if it matches."""
    if not ioeventfd_in_range(p, addr, data):
        return False
    with p.lock:
        if not p.released:
            eventfd_signal(p.fd)
    return True


def kvm_io_bus_write(kvm: Any, bus: int, addr: int, data: bytes) -> bool:
    """A guest write an ioeventfd takes (the eventfd is signalled, nothing exits): True."""
    return any(ioeventfd_write(p, addr, data) for p in kvm.buses[bus].get(addr, ()))


def ioeventfd_bus_from_flags(flags: int) -> int:
    if flags & KVM_IOEVENTFD_FLAG_PIO:
        return KVM_PIO_BUS
    if flags & KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY:
        return KVM_VIRTIO_CCW_NOTIFY_BUS
    return KVM_MMIO_BUS


def ioeventfd_check_collision(kvm: Any, p: Ioeventfd) -> bool:
    """Same bus and address, and a write could match both: either has length 0, or the same
    length with either a wildcard or the same value."""
    return any(
        q.bus_idx == p.bus_idx
        and q.addr == p.addr
        and (
            not q.length
            or not p.length
            or (q.length == p.length and (q.wildcard or p.wildcard or q.datamatch == p.datamatch))
        )
        for q in kvm.ioeventfds
    )


def _publish(kvm: Any, bus_idx: int) -> None:
    """Rebuild a bus's address map; vCPUs read the old or the new one, never half of one."""
    devices: dict[int, tuple[Ioeventfd, ...]] = {}
    for p in kvm.ioeventfds:
        if p.bus_idx == bus_idx:
            devices[p.addr] = (*devices.get(p.addr, ()), p)
    kvm.buses[bus_idx] = devices


def ioeventfd_release(p: Ioeventfd) -> None:
    with p.lock:
        p.released = True
        os.close(p.fd)


def kvm_assign_ioeventfd(kvm: Any, args: kvm_h.kvm_ioeventfd) -> int:
    """The checks in KVM's order: length, wrap-around, flags, length 0 with DATAMATCH, the fd,
    then a collision (EEXIST)."""
    if args.len not in (0, 1, 2, 4, 8):
        note("len must be 0, 1, 2, 4 or 8", len=args.len)
        fail(errno.EINVAL)
    if args.addr + args.len > 0xFFFFFFFFFFFFFFFF:
        fail(errno.EINVAL)
    if args.flags & ~KVM_IOEVENTFD_VALID_FLAG_MASK:
        fail(errno.EINVAL)
    if not args.len and args.flags & KVM_IOEVENTFD_FLAG_DATAMATCH:
        note("a length-0 ioeventfd matches any write: no value to compare")
        fail(errno.EINVAL)
    ctx = eventfd_ctx_fdget(args.fd)
    wildcard = not args.flags & KVM_IOEVENTFD_FLAG_DATAMATCH
    bus_idx = ioeventfd_bus_from_flags(args.flags)
    with kvm.slots_lock:
        dup = eventfd_dup(args.fd, ctx.id)
        if dup is None:
            fail(errno.EBADF)  # closed meanwhile
        p = Ioeventfd(bus_idx, args.addr, args.len, ctx.id, dup, args.datamatch, wildcard)
        if ioeventfd_check_collision(kvm, p):
            note("another ioeventfd takes the same writes")
            ioeventfd_release(p)
            fail(errno.EEXIST)
        kvm.ioeventfds.append(p)
        _publish(kvm, bus_idx)
    return 0


def kvm_deassign_ioeventfd(kvm: Any, args: kvm_h.kvm_ioeventfd) -> int:
    """Remove the ioeventfd with this eventfd, bus, address, length and value: ENOENT if none.
    Nothing else is checked, as in KVM."""
    ctx = eventfd_ctx_fdget(args.fd)
    bus_idx = ioeventfd_bus_from_flags(args.flags)
    wildcard = not args.flags & KVM_IOEVENTFD_FLAG_DATAMATCH
    with kvm.slots_lock:
        for p in kvm.ioeventfds:
            if (p.bus_idx, p.eventfd_id, p.addr, p.length, p.wildcard) != (
                bus_idx,
                ctx.id,
                args.addr,
                args.len,
                wildcard,
            ):
                continue
            if not wildcard and p.datamatch != args.datamatch:
                continue
            kvm.ioeventfds.remove(p)
            _publish(kvm, bus_idx)
            ioeventfd_release(p)
            return 0
    fail(errno.ENOENT)


@traced(
    args=lambda kvm, args: {
        "addr": args.addr,
        "len": args.len,
        "fd": args.fd,
        "flags": args.flags,
    }
)
def kvm_ioeventfd(kvm: Any, args: kvm_h.kvm_ioeventfd) -> int:
    """KVM_IOEVENTFD: DEASSIGN or assign."""
    if args.flags & KVM_IOEVENTFD_FLAG_DEASSIGN:
        return kvm_deassign_ioeventfd(kvm, args)
    return kvm_assign_ioeventfd(kvm, args)


# --- the VM goes ------------------------------------------------------------------------------


def kvm_eventfd_init(kvm: Any) -> None:
    """kvm_eventfd_init: no irqfds, no ioeventfds, empty buses."""
    kvm.irqfds = KvmIrqfds()
    kvm.ioeventfds = []
    kvm.buses = [{} for _ in range(KVM_NR_BUSES)]


def kvm_eventfd_release(kvm: Any) -> None:
    """Drop every irqfd and ioeventfd of a VM that goes."""
    kvm_irqfd_release(kvm)
    with kvm.slots_lock:
        ioeventfds, kvm.ioeventfds = kvm.ioeventfds, []
        kvm.buses = [{} for _ in range(KVM_NR_BUSES)]
    for p in ioeventfds:
        ioeventfd_release(p)
