"""Signals and kicks: how a vCPU gets out of KVM_RUN without the guest asking.

On the host a signal to a vCPU thread makes KVM_RUN return -EINTR with KVM_EXIT_INTR. Python
runs signal handlers only between bytecodes, never inside Unicorn's `emu_start`, so a watcher
thread listens on `signal.set_wakeup_fd` (which the interpreter's C-level handler writes to the
moment any signal arrives) and kicks every vCPU that is in the guest. Those vCPUs return EINTR;
the Python handler (KeyboardInterrupt from Ctrl-C or a notebook's interrupt) then runs as usual.
Difference from the host, documented in docs/kernel.md: a signal interrupts every running vCPU
of the process, not only the thread it was sent to.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import signal
import termios
import threading
import time
from typing import Any

_running: dict[int, Any] = {}  # vcpu id() -> vcpu, while inside KVM_RUN
_pending: set[int] = set()  # vCPUs a signal reached while they were in KVM_RUN
_lock = threading.Lock()
_watcher_started = False
_chained_fd = -1
_write_fd = -1
_read_fd = -1
_asserted_at = -1e9
_unread = array.array("i", [0])  # FIONREAD's answer: bytes waiting in the wakeup pipe


def _watch(read_fd: int) -> None:
    while True:
        select.select([read_fd], [], [])
        _take_signals(read_fd)


def _take_signals(read_fd: int) -> None:
    """Signals that arrived: every vCPU now in KVM_RUN gets one (and is kicked out)."""
    try:
        data = os.read(read_fd, 512)
    except BlockingIOError:
        return
    if _chained_fd >= 0:  # keep the wakeup fd someone else installed (e.g. asyncio) working
        with contextlib.suppress(OSError):
            os.write(_chained_fd, data)
    with _lock:
        vcpus = list(_running.values())
        _pending.update(id(v) for v in vcpus)
    for vcpu in vcpus:
        vcpu.arch.hw.kick()


def start_signal_watcher() -> None:
    """Install the wakeup fd and its watcher (once), or put the fd back if someone replaced it.

    Only the main thread may set the wakeup fd; others leave it as it is. Event loops (asyncio,
    nbclient) install or clear their own wakeup fd, so this runs on every KVM_RUN made from
    the main thread: theirs is chained, not lost, and ours is restored.
    """
    global _watcher_started, _chained_fd, _write_fd, _read_fd
    if threading.current_thread() is not threading.main_thread():
        return
    if not _watcher_started:
        _read_fd, _write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threading.Thread(
            target=_watch, args=(_read_fd,), name="kvmlab-signals", daemon=True
        ).start()
        _watcher_started = True
    current = signal.set_wakeup_fd(_write_fd, warn_on_full_buffer=False)
    if current != _write_fd:
        _chained_fd = current


REASSERT_EVERY = 1.0  # seconds: set_wakeup_fd costs about 1.4 us, too much for every exit


def enter_kvm_run(vcpu: Any) -> None:
    """Mark `vcpu` as inside KVM_RUN, so that signals reach it (the watcher kicks it).
    Signals that arrived before this entry and the watcher has not taken yet are taken now,
    for the vCPUs already running: they do not belong to this KVM_RUN."""
    global _asserted_at
    now = time.monotonic()
    if now - _asserted_at > REASSERT_EVERY:  # an event loop may have replaced our wakeup fd
        start_signal_watcher()
        _asserted_at = now
    if _read_fd >= 0:
        fcntl.ioctl(_read_fd, termios.FIONREAD, _unread)  # 0.3 us, a read would cost 1.3
        if _unread[0]:
            _take_signals(_read_fd)
    with _lock:
        _running[id(vcpu)] = vcpu


def leave_kvm_run(vcpu: Any) -> None:
    with _lock:
        del _running[id(vcpu)]
        _pending.discard(id(vcpu))


def signal_pending(vcpu: Any) -> bool:
    """Has a signal arrived for this vCPU's thread since it entered KVM_RUN? Clears it."""
    key = id(vcpu)
    if key not in _pending and not vcpu.kicked:
        return False
    with _lock:
        _pending.discard(key)
        vcpu.kicked = False
    return True


def kvm_vcpu_kick(vcpu: Any) -> None:
    """Make a vCPU leave the guest as if its thread got a signal it blocks outside KVM_RUN
    (QEMU's SIG_IPI): a kick that lands before KVM_RUN has begun is not lost, the next
    KVM_RUN returns EINTR at once."""
    with _lock:
        vcpu.kicked = True
    vcpu.arch.hw.kick()
