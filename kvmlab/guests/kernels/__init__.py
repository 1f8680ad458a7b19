"""Small multiboot kernels, as sources, built with the host's gcc (-m32, freestanding, at 1 MiB).

They boot like any kernel built for QEMU's `-kernel` (see kvmlab.vmm.pc); the tests boot them
on both backends, and notebook 12 shows one booting. Binaries are not shipped: gcc versions
would make them differ, so they are built where gcc with 32-bit support is installed.

`build_kernels(directory)` returns their paths: hello.elf (assembly, an a.out-kludge header),
hello.bin (the same as a flat image, booted through that header alone), probe.elf (C: reports
the multiboot information, fw_cfg, the CPU and the local APIC). `toolchain_missing()` says why
they cannot be built here, or None.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = Path(__file__).parent
CFLAGS = [
    "-m32",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pie",
    "-no-pie",
    "-static",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
    "-T",
    str(SOURCES / "kernel.ld"),
]
KERNELS = {"hello.elf": ["hello.S"], "probe.elf": ["entry.S", "probe.c"]}


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")


def toolchain_missing() -> str | None:
    """Why 32-bit freestanding kernels cannot be built here (None if they can)."""
    for tool in ("gcc", "objcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _run(["gcc", *CFLAGS, str(SOURCES / "hello.S"), "-o", str(Path(tmp) / "k")])
        except RuntimeError as e:
            return f"gcc cannot build 32-bit kernels here: {str(e).splitlines()[-1]}"
    return None


def build_kernels(directory: Path) -> dict[str, Path]:
    """Compile and link every kernel into `directory`; RuntimeError with gcc's words if not."""
    built = {}
    for name, sources in KERNELS.items():
        built[name] = directory / name
        _run(["gcc", *CFLAGS, *(str(SOURCES / s) for s in sources), "-o", str(built[name])])
    built["hello.bin"] = directory / "hello.bin"
    _run(["objcopy", "-O", "binary", str(built["hello.elf"]), str(built["hello.bin"])])
    return built
