"""`python -m kvmlab.guests`: assemble every sample again into bin/ (needs Keystone)."""

from pathlib import Path

from kvmlab.asm import assemble
from kvmlab.guests import GUEST_BASE, SAMPLES

for guest in SAMPLES.values():
    code = assemble(guest.source, mode=guest.asm_mode, base=GUEST_BASE).code
    path = Path(__file__).parent / "bin" / f"{guest.file}.bin"
    path.write_bytes(code)
    print(f"{path}: {len(code)} bytes")
