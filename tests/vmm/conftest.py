"""Fixtures for the VMM tests: machines on either backend, always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from kvmlab.vmm import Machine


@pytest.fixture
def make_machine(k: ModuleType) -> Iterator[Callable[..., Machine]]:
    """Machine(k, ...) that is closed when the test ends, whatever happened."""
    machines: list[Machine] = []

    def make(**kwargs: Any) -> Machine:
        m = Machine(k, **kwargs)
        machines.append(m)
        return m

    yield make
    for m in machines:
        m.close()
