"""Run every scenario on the simulator and on the host's /dev/kvm, and compare the results.

- `test_scenario[sim-<name>]`: the scenario on kvmlab's simulated /dev/kvm. Each scenario asserts
  its key facts itself, so this is a real test on machines without /dev/kvm.
- `test_scenario[host-<name>]`: the same on the host (skips when /dev/kvm is unusable). This keeps
  the scenarios themselves honest: their built-in expectations are what real KVM does.
- `test_sim_matches_host[<name>]`: both, and the results must be equal, except for the keys a
  scenario documents as differing (see `registry.Scenario.documented`), where each backend must
  return its own documented value.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import BACKENDS, load_backend

from .registry import Scenario
from .scenarios import SCENARIOS

NAMES = sorted(SCENARIOS)


def backend_params() -> list[Any]:
    params = []
    for backend in BACKENDS:
        marks = [pytest.mark.host] if backend == "host" else []
        for name in NAMES:
            params.append(pytest.param(backend, name, id=f"{backend}-{name}", marks=marks))
    return params


def split_documented(scn: Scenario, backend: str, result: Any) -> Any:
    """Check each documented key holds `backend`'s documented value; return the rest of result."""
    if not scn.documented:
        return result
    assert isinstance(result, dict), f"{scn.name}: documented keys need a dict result"
    rest = dict(result)
    for key, by_backend in scn.documented.items():
        value = rest.pop(key)
        assert value == by_backend[backend], (
            f"{scn.name}: {key} = {value!r} on {backend}, documented {by_backend[backend]!r}"
        )
    return rest


@pytest.mark.parametrize(("backend", "name"), backend_params())
def test_scenario(backend: str, name: str) -> None:
    k = load_backend(backend)
    scn = SCENARIOS[name]
    split_documented(scn, backend, scn(k))


@pytest.mark.host
@pytest.mark.parametrize("name", NAMES)
def test_sim_matches_host(name: str) -> None:
    host = load_backend("host")  # skips first when /dev/kvm is unusable
    sim = load_backend("sim")
    scn = SCENARIOS[name]
    on_host = split_documented(scn, "host", scn(host))
    on_sim = split_documented(scn, "sim", scn(sim))
    assert on_sim == on_host


def test_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 35
