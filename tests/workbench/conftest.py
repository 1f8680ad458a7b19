"""Fixtures for the Workbench tests: a model on either backend, always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmlab import host
from kvmlab.workbench import Workbench


@pytest.fixture(params=["sim", "host"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "host" and (reason := host.available()) is not None:
        pytest.skip(f"host /dev/kvm unusable: {reason}")
    return str(request.param)


@pytest.fixture
def make_wb(backend: str) -> Iterator[Callable[..., Workbench]]:
    """Workbench(source, backend=...) assembled, closed when the test ends."""
    made: list[Workbench] = []

    def make(source: str, assemble: bool = True, **kwargs: Any) -> Workbench:
        wb = Workbench(source, backend=backend, **kwargs)
        made.append(wb)
        if assemble:
            assert wb.assemble(), wb.errors
        return wb

    yield make
    for wb in made:
        wb.close()
