"""The small QEMU's speed: serial bytes through the whole loop, and timer interrupts taken.

(a) Serial bytes per second: a guest writes N bytes to COM1's THR, one OUT exit each, and every
    exit goes through kvm_cpu_exec, the IO bus and the 16550 model into its output buffer.
    Reported for the simulator beside the same Machine on the host's /dev/kvm.
(b) Timer interrupts per second: the PIT at 2 kHz, each tick taken by the guest through the
    8259 model, KVM_INTERRUPT (or an interrupt window) and an EOI, counted for one second.
    A figure against the programmed rate: 1.0 means no tick was lost.
"""

from __future__ import annotations

import time
from types import ModuleType

from benchmarks.results import Figure, figure
from kvmlab import host
from kvmlab import sys as sim
from kvmlab.asm import assemble
from kvmlab.vmm import Machine

ENTRY = 0x1000
SERIAL = """
    mov dx, 0x3f8
    mov cx, COUNT
again:
    mov al, 'k'
    out dx, al
    loop again
    hlt
"""
TIMER_HZ = 2000
TIMER = f"""
    cli
    mov word ptr [0x20 * 4], tick
    mov word ptr [0x20 * 4 + 2], 0
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0x34
    out 0x43, al
    mov ax, {1_193_182 // TIMER_HZ}
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
idle:
    hlt
    jmp idle
tick:
    push ax
    inc dword ptr [0x3000]
    mov al, 0x20
    out 0x20, al
    pop ax
    iret
"""


def serial_rate(k: ModuleType, count: int) -> float:
    """Bytes per second from the guest's OUT to the UART's output."""
    code = assemble(SERIAL.replace("COUNT", str(count)), mode="16", base=ENTRY).code
    with Machine(k) as m:
        m.boot(code, "real", ENTRY)
        start = time.perf_counter()
        m.run(max_exits=count + 10)
        elapsed = time.perf_counter() - start
        assert len(m.serial.text()) == count, "the guest's bytes did not all arrive"
    return count / elapsed


def timer_rate(k: ModuleType, seconds: float = 1.0) -> float:
    """Timer interrupts the guest counted per second, on vCPU threads."""
    code = assemble(TIMER, mode="16", base=ENTRY).code
    with Machine(k) as m:
        m.boot(code, "real", ENTRY)
        m.start()
        time.sleep(0.1)  # programmed and ticking
        before = int.from_bytes(m.ram[0x3000:0x3004], "little")
        time.sleep(seconds)
        after = int.from_bytes(m.ram[0x3000:0x3004], "little")
        m.stop()
    return (after - before) / seconds


def main() -> list[Figure]:
    reason = host.available()
    count = 20_000
    sim_rate = max(serial_rate(sim, count) for _ in range(3))
    print("(a) serial bytes/s, guest OUT -> kvm_cpu_exec -> 16550 model")
    print(f"    kvmlab                    {sim_rate / 1e3:8.1f} k/s")
    host_rate = None
    if reason is None:
        host_rate = max(serial_rate(host, count) for _ in range(3))
        print(f"    host /dev/kvm             {host_rate / 1e3:8.1f} k/s   ratio "
              f"{sim_rate / host_rate:.2f}")  # fmt: skip
    else:
        print(f"    host /dev/kvm: skipped ({reason})")
    figures = [
        figure(
            "vmm",
            "serial bytes through kvm_cpu_exec",
            sim_rate / 1e3,
            "k/s",
            "host /dev/kvm" if host_rate else None,
            host_rate and host_rate / 1e3,
        )
    ]
    print(f"(b) timer interrupts/s taken by the guest, PIT at {TIMER_HZ} Hz")
    for name, k in (("kvmlab", sim), ("host /dev/kvm", host)):
        if k is host and reason is not None:
            print(f"    host /dev/kvm: skipped ({reason})")
            continue
        rate = timer_rate(k)
        print(f"    {name:<25} {rate:8.0f} /s   ratio to the PIT {rate / TIMER_HZ:.2f}")
        figures.append(
            figure(
                "vmm", f"timer interrupts taken ({name})", rate, "/s", "the PIT's rate", TIMER_HZ
            )
        )
    return figures


if __name__ == "__main__":
    main()
