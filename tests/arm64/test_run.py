"""KVM_RUN on arm64: MMIO exits, PSCI through hvc, CPU_ON, WFI, signals and the trace."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from kvmlab import sys_arm64 as k
from kvmlab.kernel import signals, trace
from kvmlab.uapi import (
    KVM_EXIT_INTR,
    KVM_EXIT_MMIO,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_IRQ_LINE,
    KVM_RUN,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    kvm_irq_level,
)
from kvmlab.uapi.arm64 import KVM_ARM_VCPU_POWER_OFF, KVM_REG_ARM_PSCI_VERSION, REG_PC

from .harness import PSCI, RAM_BASE, Vm

OFF = "ldr x0, =0x84000008\nhvc #0\n"


def start(vm: Vm, source: str, features: int = PSCI) -> object:
    vm.load(source)
    vcpu = vm.vcpu(features=features)
    vcpu.set(REG_PC, RAM_BASE)
    return vcpu


def errno_of(fn: object) -> str:
    with pytest.raises(OSError) as caught:
        fn()  # type: ignore[operator]
    return errno.errorcode[caught.value.errno]


def test_mmio_store_exits_with_pc_on_it_and_moves_on_at_the_next_run(vm: Vm) -> None:
    vcpu = start(vm, "ldr x1, =0x09000000\nmov w2, #0x48\nstrb w2, [x1]\n" + OFF)
    run = vcpu.run()  # type: ignore[attr-defined]
    assert (run.exit_reason, run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (
        KVM_EXIT_MMIO,
        0x09000000,
        1,
        1,
    )
    assert run.mmio.data[0] == 0x48 and vcpu.pc == RAM_BASE + 8  # type: ignore[attr-defined]
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("load", "data", "x5"),
    [
        ("ldr w5, [x1]", b"\x90\x80\x70\xf0", 0xF0708090),  # a W load zero-extends
        ("ldrsb x5, [x1]", b"\x90", 0xFFFFFFFFFFFFFF90),  # sign-extended to 64 bits
        ("ldrsh w5, [x1]", b"\x00\x80", 0xFFFF8000),  # to 32 bits, upper half zero
        ("ldr x5, [x1, #8]", bytes(range(1, 9)), 0x0807060504030201),
    ],
)
def test_mmio_load_takes_userspace_data_on_reentry(vm: Vm, load: str, data: bytes, x5: int) -> None:
    vcpu = start(vm, f"ldr x1, =0x09000000\nmov x5, #7\n{load}\n" + OFF)
    run = vcpu.run()  # type: ignore[attr-defined]
    assert (run.exit_reason, run.mmio.is_write, run.mmio.len) == (KVM_EXIT_MMIO, 0, len(data))
    assert vcpu.x(5) == 7  # type: ignore[attr-defined]  # Unicorn's early write does not leak
    assert vcpu.pc == RAM_BASE + 8  # type: ignore[attr-defined]
    run.mmio.data[: len(data)] = list(data)
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT  # type: ignore[attr-defined]
    assert vcpu.x(5) == x5  # type: ignore[attr-defined]


def test_a_load_without_syndrome_fails_with_enosys(vm: Vm) -> None:
    vcpu = start(vm, "ldr x1, =0x09000000\nldp x2, x3, [x1]\n" + OFF)
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_RUN, 0)) == "ENOSYS"  # type: ignore[attr-defined]


def test_fetch_outside_every_slot_is_enoexec(vm: Vm) -> None:
    vcpu = start(vm, "ldr x1, =0x20000000\nbr x1\n")
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_RUN, 0)) == "ENOEXEC"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("features", "version", "x0"),
    [(PSCI, None, 0x10001), (PSCI, 0x2, 0x2), (0, None, 2**64 - 1)],  # 0.1: not a 0.2 id
)
def test_psci_version(vm: Vm, features: int, version: int | None, x0: int) -> None:
    vcpu = start(
        vm, "ldr x0, =0x84000000\nhvc #0\nmov x5, x0\nmov x2, #1\nstr x2, [x2]\n", features
    )
    if version is not None:
        vcpu.set(KVM_REG_ARM_PSCI_VERSION, version)  # type: ignore[attr-defined]
    assert vcpu.run().exit_reason == KVM_EXIT_MMIO  # type: ignore[attr-defined]
    assert vcpu.x(5) == x0  # type: ignore[attr-defined]


def test_unknown_function_is_not_supported_in_x0(vm: Vm) -> None:
    vcpu = start(vm, "ldr x0, =0x8400ABCD\nhvc #0\nmov x5, x0\nmov x2, #1\nstr x2, [x2]\n")
    vcpu.run()  # type: ignore[attr-defined]
    assert vcpu.x(5) == 2**64 - 1  # type: ignore[attr-defined]  # PSCI_RET_NOT_SUPPORTED


@pytest.mark.parametrize(
    ("fn", "event"),
    [(0x84000008, KVM_SYSTEM_EVENT_SHUTDOWN), (0x84000009, KVM_SYSTEM_EVENT_RESET)],
)
def test_system_off_and_reset_are_system_events(vm: Vm, fn: int, event: int) -> None:
    vcpu = start(vm, f"ldr x0, ={fn:#x}\nhvc #0\n")
    run = vcpu.run()  # type: ignore[attr-defined]
    assert (run.exit_reason, run.system_event.type, run.system_event.ndata) == (
        KVM_EXIT_SYSTEM_EVENT,
        event,
        1,
    )
    assert run.system_event.data[0] == 0
    assert vcpu.pc == RAM_BASE + 8  # type: ignore[attr-defined]  # past the hvc
    assert vcpu.x(0) == 2**64 - 6  # type: ignore[attr-defined]  # INTERNAL_FAILURE if re-run


def _kick_after(vcpu: object, seconds: float) -> threading.Thread:
    def later() -> None:
        time.sleep(seconds)
        signals.kvm_vcpu_kick(vcpu)

    thread = threading.Thread(target=later)
    thread.start()
    return thread


def _kernel_vcpu(vm: Vm, index: int = 0) -> object:
    from kvmlab.kernel import fs

    file = fs.fdget(vm.vcpus[index].fd)
    assert file is not None
    return file.private_data


def test_wfi_blocks_until_a_kick_which_is_eintr_with_kvm_exit_intr(vm: Vm) -> None:
    vcpu = start(vm, "wfi\n" + OFF)
    thread = _kick_after(_kernel_vcpu(vm), 0.2)
    began = time.monotonic()
    assert errno_of(lambda: k.ioctl(vcpu.fd, KVM_RUN, 0)) == "EINTR"  # type: ignore[attr-defined]
    thread.join()
    assert time.monotonic() - began >= 0.19
    assert vcpu.run_struct.exit_reason == KVM_EXIT_INTR  # type: ignore[attr-defined]
    assert vcpu.pc == RAM_BASE + 4  # type: ignore[attr-defined]
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT  # type: ignore[attr-defined]


def test_an_irq_line_wakes_wfi_even_with_interrupts_masked(vm: Vm) -> None:
    vcpu = start(vm, "wfi\n" + OFF)

    def raise_line() -> None:
        time.sleep(0.1)
        k.ioctl(vm.fd, KVM_IRQ_LINE, kvm_irq_level(irq=0, level=1))

    thread = threading.Thread(target=raise_line)
    thread.start()
    assert vcpu.run().exit_reason == KVM_EXIT_SYSTEM_EVENT  # type: ignore[attr-defined]
    thread.join()


def test_cpu_on_starts_a_powered_off_vcpu_with_its_context_id(vm: Vm) -> None:
    vm.load(
        "ldr x0, =0xC4000003\nmov x1, #1\nldr x2, =0x40000100\nldr x3, =0xC0FFEE\nhvc #0\n"
        "mov x6, x0\nwfi\n" + OFF
    )
    vm.load("mov x7, x0\nldr x1, =0x09000000\nstr x7, [x1]\n" + OFF, at=0x40000100)
    boot = vm.vcpu(0)
    boot.set(REG_PC, RAM_BASE)
    second = vm.vcpu(1, PSCI | 1 << KVM_ARM_VCPU_POWER_OFF)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(second.run().exit_reason))
    thread.start()
    time.sleep(0.1)
    assert thread.is_alive()  # a stopped vCPU sleeps in KVM_RUN
    _kick_after(_kernel_vcpu(vm), 0.3)
    assert errno_of(lambda: boot.run()) == "EINTR"  # CPU_ON done, then wfi, then the kick
    assert boot.x(6) == 0  # PSCI_RET_SUCCESS
    thread.join(5)
    assert results == [KVM_EXIT_MMIO]
    assert second.run_struct.mmio.phys_addr == 0x09000000
    assert int.from_bytes(bytes(second.run_struct.mmio.data), "little") == 0xC0FFEE


def test_the_trace_shows_the_arm64_run_loop(vm: Vm) -> None:
    vcpu = start(vm, "wfi\n" + OFF)
    k.ioctl(vm.fd, KVM_IRQ_LINE, kvm_irq_level(irq=0, level=1))
    with trace.recording() as rec:
        vcpu.run()  # type: ignore[attr-defined]
    calls = rec.calls()
    assert calls[:6] == [
        "kvm_vcpu_ioctl",
        "kvm_arch_vcpu_run_pid_change",
        "kvm_vcpu_first_run_init",
        "kvm_arch_vcpu_ioctl_run",
        "xfer_to_guest_mode_handle_work",
        "check_vcpu_requests",
    ]
    assert calls[6:9] == ["kvm_arm_vcpu_enter_exit", "__kvm_vcpu_run", "handle_exit"]
    assert calls[9:11] == ["kvm_handle_wfx", "kvm_vcpu_wfi"]
    assert (
        calls[-5:]
        == [
            "__kvm_vcpu_run",
            "handle_exit",
            "handle_hvc",
            "kvm_smccc_call_handler",
            "kvm_psci_call",
        ]
        or "kvm_prepare_system_event" in calls
    )
    tree = rec.tree()
    assert "kvm_vgic_flush_hwstate" in tree and "kvm_timer_sync_user" in tree
    assert "handle_exit(exception=ARM_EXCEPTION_TRAP, ec=ESR_ELx_EC_HVC64)" in tree
