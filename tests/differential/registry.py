"""The scenario registry: `@scenario` adds a function `f(k) -> plain data` under its name.

A scenario is written only against the syscall face `k` and `kvmlab.uapi`. It asserts the key facts
itself (so running it on the simulator alone is a real test) and returns plain comparable data
(ints, strings, tuples, dicts, bytes; errno values by name, e.g. "EINVAL"), which the differential
test compares between the simulator and the host.

Results must be equal on both backends, except for keys listed in `documented`: those are known,
documented differences between the simulator (which follows upstream VMX/SVM KVM) and this host.
For each such key the test asserts that every backend returns its own documented value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Backend = str  # "sim" or "host"
ScenarioFn = Callable[[Any], Any]


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    # result key -> {backend: the value that backend is documented to return}
    documented: dict[str, dict[Backend, Any]] = field(default_factory=dict)

    def __call__(self, k: Any) -> Any:
        return self.fn(k)


SCENARIOS: dict[str, Scenario] = {}


class OneOf:
    """A documented value a host gives in one of several forms, depending on timing."""

    def __init__(self, *values: Any) -> None:
        self.values = values

    def __eq__(self, other: object) -> bool:
        return other in self.values

    def __repr__(self) -> str:
        return f"one of {self.values!r}"


def scenario(
    fn: ScenarioFn | None = None, *, documented: dict[str, dict[Backend, Any]] | None = None
) -> Any:
    """Register `fn` as a scenario named after the function (usable with or without arguments)."""

    def register(f: ScenarioFn) -> ScenarioFn:
        if f.__name__ in SCENARIOS:
            raise ValueError(f"duplicate scenario {f.__name__}")
        SCENARIOS[f.__name__] = Scenario(f.__name__, f, dict(documented or {}))
        return f

    return register(fn) if fn is not None else register


def host_is_pvm() -> bool:
    """True when the host's /dev/kvm is served by PVM (the software backend, kvm_pvm)."""
    return os.path.isdir("/sys/module/kvm_pvm")
