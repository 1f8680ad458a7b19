"""The `kvmlab` command end to end: guests that work, and every way a run can go wrong."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_backend

from kvmlab.cli import main

HELLO = """\
; print hi on the serial port, then halt
    mov dx, 0x3f8
    mov al, 'h'
    out dx, al
    mov al, 'i'
    out dx, al
    hlt
"""


def kvmlab(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed command the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", "kvmlab.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_run_prints_the_guests_serial_output_and_its_exits(tmp_path: Path, mode: str) -> None:
    guest = tmp_path / "hello.asm"
    guest.write_text(HELLO)
    done = kvmlab("run", str(guest), "--mode", mode)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "hi"
    assert [line.split()[1] for line in lines[2:5]] == ["IO", "IO", "HLT"]


def test_run_with_trace_shows_the_kernel_call_path(tmp_path: Path) -> None:
    guest = tmp_path / "hello.asm"
    guest.write_text(HELLO)
    done = kvmlab("run", str(guest), "--trace")
    assert done.returncode == 0, done.stderr
    assert "-> kvm_vcpu_ioctl(vcpu=0, cmd=KVM_RUN)" in done.stdout
    assert "-> handle_io()" in done.stdout and "-> kvm_emulate_halt()" in done.stdout


def test_a_flat_binary_runs_as_it_is(tmp_path: Path) -> None:
    guest = tmp_path / "hlt.bin"
    guest.write_bytes(b"\xf4")
    done = kvmlab("run", str(guest))
    assert done.returncode == 0 and "HLT" in done.stdout


def test_a_missing_file_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    done = kvmlab("run", str(tmp_path / "nope.asm"))
    assert done.returncode != 0
    assert "cannot read" in done.stderr and "Traceback" not in done.stderr


def test_bad_assembly_names_its_line(tmp_path: Path) -> None:
    guest = tmp_path / "bad.asm"
    guest.write_text("nop\nmov ax, bx\nfrobnicate ax\nhlt\n")
    done = kvmlab("run", str(guest))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "line 3" in done.stderr and "frobnicate" in done.stderr


def test_a_runaway_guest_is_stopped_at_the_timeout(tmp_path: Path) -> None:
    guest = tmp_path / "spin.bin"
    guest.write_bytes(b"\xeb\xfe")  # jmp $
    start = time.monotonic()
    done = kvmlab("run", str(guest), "--timeout", "0.5")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "runaway" in done.stdout
    assert time.monotonic() - start < 30


def test_info_lists_the_backends_and_what_they_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sim: kvmlab's simulated /dev/kvm" in out and "KVM_GET_API_VERSION = 12" in out
    assert "host:" in out


@pytest.mark.parametrize(("name", "output"), [("timer", "10 ticks"), ("smp", "handshake done")])
def test_a_sample_guest_runs_by_its_name(name: str, output: str) -> None:
    done = kvmlab("run", name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert output in done.stdout


def test_info_lists_the_sample_guests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert "  timer            real       ten PIT interrupts" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(tmp_path: Path) -> None:
    guest = tmp_path / "chatty.bin"
    guest.write_bytes(b"\xe6\x80\xeb\xfc")  # l: out 0x80, al; jmp l
    cli = [sys.executable, "-m", "kvmlab.cli", "run", str(guest), "--max-exits", "5000"]
    with subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(5)
        proc.stdout.close()  # as `| head -c 5` does, long before the 5,000-line exit table ends
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err


def exit_table(stdout: str) -> list[list[str]]:
    """The rows of `kvmlab run`'s exit table: seq, exit, rip, where, dir, data."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["seq", "exit"])
    return [line.split() for line in lines[header + 1 :] if line.split()[:1] != []]


@pytest.mark.parametrize("backend", ["sim", pytest.param("host", marks=pytest.mark.host)])
def test_run_irqchip_kernel_keeps_hlt_and_the_pic_out_of_the_exit_table(backend: str) -> None:
    if backend == "host":
        load_backend("host")  # skips without a usable /dev/kvm
    tables = {}
    for irqchip in ("user", "kernel"):
        done = kvmlab("run", "timer", "--irqchip", irqchip, "--backend", backend)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("..........\n10 ticks\n")
        tables[irqchip] = exit_table(done.stdout)
    user_ports = {int(row[3], 16) for row in tables["user"] if row[1] == "IO"}
    kernel_ports = {int(row[3], 16) for row in tables["kernel"] if row[1] == "IO"}
    assert "HLT" in {row[1] for row in tables["user"]} and {0x20, 0x43} <= user_ports
    assert {row[1] for row in tables["kernel"]} <= {"IO", "INTR"}  # HLT stays in KVM
    assert kernel_ports == {0x80, 0x3F8}  # the PIC and PIT ports never exit


def test_run_refuses_the_sipi_sample_with_the_irqchip_in_userspace() -> None:
    done = kvmlab("run", "smp-sipi", "--irqchip", "user")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "INIT and SIPI" in done.stderr and "--irqchip kernel" in done.stderr


def test_run_rejects_an_unknown_irqchip() -> None:
    done = kvmlab("run", "timer", "--irqchip", "split")
    assert done.returncode == 2 and "invalid choice: 'split'" in done.stderr
