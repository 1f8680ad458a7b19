"""Shared fixtures: the two backends a differential scenario runs on."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

from kvmlab import host
from kvmlab.guests.kernels import build_kernels, toolchain_missing

BACKENDS = ("sim", "host")


def load_backend(name: str) -> ModuleType:
    """The syscall face of one backend: `kvmlab.sys` (simulated) or `kvmlab.host` (the host)."""
    if name == "host":
        reason = host.available()
        if reason is not None:
            pytest.skip(f"host /dev/kvm unusable: {reason}")
        return host
    return importlib.import_module("kvmlab.sys")


@pytest.fixture(params=BACKENDS)
def k(request: pytest.FixtureRequest) -> ModuleType:
    """A backend with open/ioctl/mmap/close, parametrised over the simulator and the host."""
    return load_backend(request.param)


@pytest.fixture(scope="session")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The multiboot test kernels, built once with gcc (skipped where gcc -m32 cannot)."""
    reason = toolchain_missing()
    if reason:
        pytest.skip(reason)
    return build_kernels(tmp_path_factory.mktemp("kernels"))
