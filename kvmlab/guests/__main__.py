"""`python -m kvmlab.guests`: assemble every sample again into bin/ (needs Keystone)."""

from pathlib import Path

from kvmlab.asm import assemble
from kvmlab.guests import ARM64_SAMPLES, SAMPLES

for guest in [*SAMPLES.values(), *ARM64_SAMPLES.values()]:
    code = assemble(guest.source, mode=guest.asm_mode, base=guest.base, arch=guest.arch).code
    path = Path(__file__).parent / guest.bin_path
    path.write_bytes(code)
    print(f"{path}: {len(code)} bytes")
