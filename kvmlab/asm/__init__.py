"""The assembler layer: guest source to bytes with Keystone, bytes to text with Capstone.

    from kvmlab.asm import assemble
    program = assemble(source, mode="16", base=0x7c00)
    program.code            # the bytes to copy into guest memory at 0x7c00
    program.line_at(rip)    # the source line the vCPU stopped on

kvmlab's dialect is Keystone's GNU-style Intel syntax, except that `;` starts a comment (as in
NASM) instead of separating statements, and NASM's `bits`, `db`/`dw`/`dd`/`dq`, `resb`...,
`times COUNT db VALUE` and `equ` are read as the GNU directives they mean. Keystone runs in a
child process with a timeout, errors carry their line, and Keystone's known wrong encodings are
repaired (16-bit `call`/`ret`/`retf`/`push imm`, 64-bit `[absolute]`) or refused (truncated
immediates, out-of-reach `loop`). Where binutils is installed, `kvmlab.asm.gnu.assemble_gnu`
builds the same source with GNU `as`, a second opinion the tests hold Keystone to.
"""

from kvmlab.asm.assembler import assemble
from kvmlab.asm.disasm import Insn, disassemble
from kvmlab.asm.program import AsmError, AsmWarning, ListingLine, Program

__all__ = [
    "AsmError",
    "AsmWarning",
    "Insn",
    "ListingLine",
    "Program",
    "assemble",
    "disassemble",
]
