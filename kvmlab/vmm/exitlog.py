"""The exit log: one small record per exit the VMM handled, for widgets, lessons and graders.

Every vCPU appends here (under the log's own lock) in the order exits were handled; `seq`
numbers them across all vCPUs, `time` is `time.monotonic()` when the record was made.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """One handled exit: what the guest asked for and where it was."""

    seq: int  # position in the log, counting every record ever appended
    time: float  # time.monotonic() when the exit was handled
    cpu: int  # vCPU index
    reason: str  # KVM_EXIT_* without the prefix: "IO", "MMIO", "HLT", "INTR", ...
    rip: int | None  # guest rip after the exit, as KVM_GET_REGS reports it
    address: int | None = None  # IO: the port; MMIO: the guest-physical address
    direction: str | None = None  # IO: "in" / "out"; MMIO: "read" / "write"
    size: int = 0  # bytes per access
    count: int = 0  # IO: elements (more than 1 for string IO)
    data: bytes = b""  # OUT/MMIO write: what the guest wrote; IN/MMIO read: what it got
    detail: str = ""  # a report for errors, an errno name for an interrupted KVM_RUN


class ExitLog:
    """An append-only list of ExitRecords; beyond `limit` the oldest records are dropped."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.records: list[ExitRecord] = []
        self.dropped = 0  # records discarded to stay within `limit`
        self._seq = 0
        self._lock = threading.Lock()

    def append(self, cpu: int, reason: str, rip: int | None, **fields: Any) -> ExitRecord:
        """Add a record (seq and time are filled in here) and return it."""
        with self._lock:
            record = ExitRecord(self._seq, time.monotonic(), cpu, reason, rip, **fields)
            self._seq += 1
            self.records.append(record)
            if len(self.records) > self.limit:
                excess = len(self.records) - self.limit
                del self.records[:excess]
                self.dropped += excess
            return record

    def clear(self) -> None:
        """Forget every record (sequence numbers keep counting)."""
        with self._lock:
            self.records.clear()

    def reasons(self) -> list[str]:
        """The exit reasons in order, e.g. ["IO", "IO", "HLT"]: what a lesson usually checks."""
        return [r.reason for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ExitRecord]:
        return iter(list(self.records))

    def __getitem__(self, index: int) -> ExitRecord:
        return self.records[index]
