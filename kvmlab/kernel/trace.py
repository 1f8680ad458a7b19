"""The call-path trace: the simulated kernel's functions, entered and left, as they run.

A kernel function marked `@traced` (with Linux's name) emits an `enter` event with the
arguments that matter and an `exit` event with its return value or errno; `note()` adds the
checks and decisions in between (`id >= KVM_MAX_VCPU_IDS`, `-> EEXIST`). Events nest by
thread, so a KVM_RUN on one vCPU thread is one tree.

Tracing costs nothing while no one listens: the marked functions are the plain functions.
`subscribe()` swaps every one of them, where the kernel's modules and classes refer to it,
for a recording wrapper, and the last `unsubscribe()` swaps the plain ones back.

    with trace.recording() as rec:
        k.ioctl(vm, KVM_CREATE_VCPU, 0)
    print(rec.tree())
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class TraceEvent:
    """One step of the call path: a function entered or left, or a note inside one."""

    seq: int
    kind: str  # "enter", "exit" or "note"
    func: str
    depth: int
    thread: str
    args: dict[str, Any] = field(default_factory=dict)
    result: Any = None  # exit: the return value (None for void)
    errno: str | None = None  # exit: the errno name when the function failed
    time: float = 0.0


@dataclass
class _Traced:
    name: str
    module: str
    attr: str
    plain: Callable[..., Any]
    wrapper: Callable[..., Any]
    args: Callable[..., dict[str, Any]] | None


_registry: list[_Traced] = []
_subscribers: dict[int, Callable[[TraceEvent], None]] = {}
_handles = itertools.count(1)
_seq = itertools.count(1)
_lock = threading.Lock()
_local = threading.local()
active = False  # read by note() callers on slow paths: skip building a note when off


def _depth() -> int:
    return getattr(_local, "depth", 0)


def _emit(event: TraceEvent) -> None:
    for callback in list(_subscribers.values()):
        callback(event)


def _errno_name(exc: BaseException) -> str:
    import errno as errno_module

    if isinstance(exc, OSError) and exc.errno is not None:
        return errno_module.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def traced(name: str | None = None, args: Callable[..., dict[str, Any]] | None = None) -> Any:
    """Mark a kernel function for the trace, under Linux's `name` (default: its own).

    `args` turns the call's arguments into the few worth showing (default: none).
    """

    def mark(fn: F) -> F:
        label = name or fn.__name__

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            depth = _depth()
            shown = args(*a, **kw) if args is not None else {}
            thread = threading.current_thread().name
            _emit(TraceEvent(next(_seq), "enter", label, depth, thread, shown, time=time.time()))
            _local.depth = depth + 1
            try:
                result = fn(*a, **kw)
            except BaseException as exc:
                _local.depth = depth
                _emit(TraceEvent(next(_seq), "exit", label, depth, thread, errno=_errno_name(exc)))
                raise
            _local.depth = depth
            shown_result = result if isinstance(result, int | str | type(None)) else None
            _emit(TraceEvent(next(_seq), "exit", label, depth, thread, result=shown_result))
            return result

        _registry.append(_Traced(label, fn.__module__, fn.__name__, fn, wrapper, args))
        return fn

    return mark


def note(text: str, **details: Any) -> None:
    """A step inside the current function (a check, a decision). Call only when `active`."""
    if active:
        thread = threading.current_thread().name
        _emit(TraceEvent(next(_seq), "note", text, _depth(), thread, details, time=time.time()))


def _swap(to_wrapper: bool) -> None:
    """Point every reference the kernel holds to a traced function at the wrapper or back."""
    swaps = {id(t.plain if to_wrapper else t.wrapper): t for t in _registry}
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("kvmlab")]:
        for owner in [module, *(v for v in vars(module).values() if isinstance(v, type))]:
            for key, value in list(vars(owner).items()):
                fn = value.__func__ if isinstance(value, staticmethod) else value
                t = swaps.get(id(fn))
                if t is None:
                    continue
                new = t.wrapper if to_wrapper else t.plain
                setattr(owner, key, staticmethod(new) if isinstance(value, staticmethod) else new)


def subscribe(callback: Callable[[TraceEvent], None]) -> int:
    """Call `callback` with every event from now on; returns a handle for unsubscribe()."""
    global active
    with _lock:
        handle = next(_handles)
        if not _subscribers:
            _swap(to_wrapper=True)
            active = True
        _subscribers[handle] = callback
    return handle


def unsubscribe(handle: int) -> None:
    global active
    with _lock:
        _subscribers.pop(handle, None)
        if not _subscribers and active:
            _swap(to_wrapper=False)
            active = False


class Recording:
    """The events of a `recording()` block, with the views a notebook shows."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []

    def calls(self) -> list[str]:
        """The functions entered, in order: the call path at a glance."""
        return [e.func for e in self.events if e.kind == "enter"]

    def tree(self, *, notes: bool = True) -> str:
        """An indented call tree: `-> f(args)` on entry, `<- f = result` / `<- f: ERRNO` on exit."""
        lines = []
        for e in self.events:
            pad = "  " * e.depth
            if e.kind == "enter":
                shown = ", ".join(f"{k}={_fmt(v)}" for k, v in e.args.items())
                lines.append(f"{pad}-> {e.func}({shown})")
            elif e.kind == "exit":
                if e.errno:
                    outcome = f": {e.errno}"
                else:  # results are fds, counts and exit codes: decimal
                    outcome = "" if e.result is None else f" = {e.result}"
                lines.append(f"{pad}<- {e.func}{outcome}")
            elif notes:
                shown = ", ".join(f"{k}={_fmt(v)}" for k, v in e.args.items())
                lines.append(f"{pad}   {e.func}" + (f" [{shown}]" if shown else ""))
        return "\n".join(lines)

    def table(self) -> list[dict[str, Any]]:
        """One row per event (seq, kind, func, depth, thread, args, result, errno)."""
        return [asdict(e) for e in self.events]

    def to_json(self) -> str:
        return json.dumps(self.table(), default=str)


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value > 9:
        return hex(value)
    return str(value)


@contextmanager
def recording() -> Iterator[Recording]:
    """Record every event while the block runs (this thread and all others)."""
    rec = Recording()
    handle = subscribe(rec.events.append)
    try:
        yield rec
    finally:
        unsubscribe(handle)
