"""`kvmlab run --kernel` end to end, as a test harness runs QEMU: the kernel's serial output on
stdout, its isa-debug-exit code as the status, and bad images refused with a message."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKENDS, load_backend

from kvmlab.vmm.multiboot import MULTIBOOT_AOUT_KLUDGE, MULTIBOOT_HEADER_MAGIC


def kvmlab(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmlab.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_status_is_the_kernels_exit_code_and_stdout_its_serial_output(
    kernels: dict[str, Path], backend: str
) -> None:
    load_backend(backend)  # skips where the host has no usable /dev/kvm
    cwd = kernels["probe.elf"].parent
    done = kvmlab("run", "--kernel", "probe.elf", "--append", "exit=42", "--backend", backend,
                  "--smp", "4", "--mem", "32", cwd=cwd)  # fmt: skip
    assert done.returncode == 42 << 1 | 1, done.stderr
    assert done.stdout.startswith("probe: booted\n") and done.stdout.endswith("probe: exit 42\n")
    assert 'cmdline "probe.elf exit=42"' in done.stdout
    assert "ram 0000000002000000 cpus 4 max 4" in done.stdout
    assert "the kernel exited with code 85" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.host
def test_both_backends_print_the_same_and_exit_the_same(kernels: dict[str, Path]) -> None:
    load_backend("host")
    for image in ("hello.elf", "hello.bin"):
        runs = [kvmlab("run", "--kernel", str(kernels[image]), "--backend", b) for b in BACKENDS]
        assert [(r.returncode, r.stdout) for r in runs] == [(33, "hello from hello.S\n")] * 2


def aout(load_addr: int, body: bytes = b"\xf4") -> bytes:
    """A flat kernel: an a.out-kludge header at load_addr, then `body` (by default, hlt)."""
    flags = MULTIBOOT_AOUT_KLUDGE
    checksum = -(MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFFFFFF
    end = load_addr + 32 + len(body)
    fields = (load_addr, load_addr, end, end, load_addr + 32)
    return struct.pack("<8I", MULTIBOOT_HEADER_MAGIC, flags, checksum, *fields) + body


@pytest.mark.parametrize(
    "image, args, message",
    [
        (b"just some bytes" * 100, (), "not a multiboot kernel"),
        (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, 62) + bytes(44)
         + struct.pack("<3I", MULTIBOOT_HEADER_MAGIC, 0, -MULTIBOOT_HEADER_MAGIC & 0xFFFFFFFF),
         (), "x86-64"),
        (aout(0x10000000), (), "outside the RAM"),
        (aout(0x100000), ("--mem", "1"), "RAM must be"),
        (aout(0x100000), ("--smp", "0"), "vCPUs"),
    ],
)  # fmt: skip
def test_a_bad_image_is_a_message_and_a_failure_not_a_traceback(
    tmp_path: Path, image: bytes, args: tuple[str, ...], message: str
) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(image)
    done = kvmlab("run", "--kernel", str(kernel), *args)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_a_kernel_that_halts_without_exiting_is_reported(tmp_path: Path) -> None:
    kernel = tmp_path / "halt"
    kernel.write_bytes(aout(0x100000))
    done = kvmlab("run", "--kernel", str(kernel))
    assert done.returncode == 4 and "halted" in done.stderr


def test_a_runaway_kernel_is_stopped_at_the_timeout(tmp_path: Path) -> None:
    kernel = tmp_path / "spin"
    kernel.write_bytes(aout(0x100000, b"\xeb\xfe"))  # jmp $
    done = kvmlab("run", "--kernel", str(kernel), "--timeout", "0.5")
    assert done.returncode == 4 and "did not exit within 0.5 s" in done.stderr


def test_guest_and_kernel_are_exclusive(tmp_path: Path) -> None:
    done = kvmlab("run")
    assert done.returncode == 2 and "either GUEST or --kernel" in done.stderr
    assert kvmlab("run", "--kernel", str(tmp_path / "missing")).returncode == 1
