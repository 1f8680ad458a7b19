"""Errors: each names its line, its source text and what is wrong in plain words."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvmlab.asm import AsmError, assemble
from kvmlab.asm.worker import WORKER


def error_of(source: str, **kwargs: object) -> AsmError:
    with pytest.raises(AsmError) as caught:
        assemble(source, **kwargs)  # type: ignore[arg-type]
    return caught.value


def test_bad_mnemonic_error_names_its_line() -> None:
    error = error_of("mov eax, 1\nmov ebx, 2\nfoo ecx, 3\nmov edx, 4", mode="32")
    assert (error.line, error.text, error.message) == (3, "foo ecx, 3", "unknown mnemonic 'foo'")
    assert str(error) == "line 3: foo ecx, 3 : unknown mnemonic 'foo'"


def test_unfinished_memory_operand_is_an_invalid_operand_not_a_silent_ebx() -> None:
    error = error_of("nop\nnop\nmov eax, [ebx+  ; oops\nnop", mode="32")
    assert str(error) == "line 3: mov eax, [ebx+  ; oops : invalid operand"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("mov eax, [ebx*3]", "invalid operand"),
        ("mov eax, (1+2", "invalid operand"),
        ("mov eax, []", "invalid operand"),
        ("mov eax,", "missing operand"),
        ("mov eax, 1 2", "invalid operand"),
        ("add", "invalid operand"),
    ],
)
def test_bad_operands_are_errors_on_their_line(line: str, message: str) -> None:
    error = error_of(f"nop\n{line}\nnop", mode="32")
    assert (error.line, error.message) == (2, message)


def test_undefined_symbol_error_names_the_symbol() -> None:
    error = error_of('start: nop\njmp start\nmov si, mesage\nmessage: .asciz "hi"')
    assert (error.line, error.message) == (3, "undefined symbol 'mesage'")


def test_redefined_label_error_points_at_the_second_definition() -> None:
    error = error_of("loop1: nop\nnop\nloop1: hlt")
    assert (error.line, error.message) == (3, "'loop1' is already defined on line 1")


def test_an_error_after_forward_references_still_gets_its_own_line() -> None:
    source = "jmp end\ncall sub\nmov ax, [bx+si+]\nsub: ret\nend: hlt"
    assert error_of(source).line == 3


def test_an_error_inside_a_rept_block_names_the_line_inside() -> None:
    error = error_of("nop\n.rept 2\nnop\nfoo\n.endr")
    assert (error.line, error.message) == (4, "unknown mnemonic 'foo'")


def test_an_error_in_a_macro_is_reported_where_the_macro_is_used() -> None:
    error = error_of(".macro twice\nfoo\n.endm\nnop\ntwice")
    assert (error.line, error.message) == (
        5,
        "macro 'twice' does not assemble here: invalid mnemonic",
    )


def test_size_without_ptr_is_an_error_instead_of_no_bytes() -> None:
    error = error_of("nop\nmov eax, dword [ebx+4]\nhlt", mode="32")
    assert error.line == 2
    assert error.message.startswith("write `dword ptr [...]`")


def test_value_too_big_for_a_data_directive_is_an_error_instead_of_a_dropped_line() -> None:
    error = error_of("nop\n.word 0x12345\nnop")
    assert (error.line, error.message) == (
        2,
        "0x12345 does not fit `.word` (16 bits): Keystone dropped the line",
    )
    assert error_of(".byte 300").message == "a value is out of range for `.byte`"


@pytest.mark.parametrize(
    ("line", "mode", "message"),
    [
        (
            "mov al, 0x1234",
            "16",
            "immediate 0x1234 does not fit in 8 bits (Keystone would keep 0x34)",
        ),
        (
            "mov ax, 0x12345",
            "16",
            "immediate 0x12345 does not fit in 16 bits (Keystone would keep 0x2345)",
        ),
        ("mov al, -129", "32", "immediate -129 does not fit in 8 bits (Keystone would keep 0x7f)"),
        ("mov ax, BIG", "16", "immediate BIG does not fit in 16 bits (Keystone would keep 0x2345)"),
    ],
)
def test_immediate_too_big_for_its_operand_is_an_error(line: str, mode: str, message: str) -> None:
    error = error_of(f".set BIG, 0x12345\n{line}", mode=mode)
    assert (error.line, error.message) == (2, message)


def test_label_beyond_a_16_bit_operand_is_an_error() -> None:
    error = error_of("mov si, msg\nmsg: .byte 0", base=0x10000 - 3)
    assert (error.line, error.message) == (1, "an address or distance does not fit this operand")


def test_immediates_that_fit_signed_or_unsigned_are_fine() -> None:
    assert assemble("mov al, -128\nmov al, 255\nadd ax, -1").code == bytes.fromhex(
        "b080 b0ff 83c0ff"
    )


def test_loop_out_of_reach_is_an_error_instead_of_a_wrapped_jump() -> None:
    error = error_of("nop\nloop far\n.fill 200, 1, 0x90\nfar: hlt")
    assert error.line == 2
    assert error.message.startswith(
        "`loop` cannot reach far (0xcb) from here (it reaches -128..+127"
    )


def test_short_jump_out_of_reach_is_blamed_on_the_jump_not_on_the_code_between() -> None:
    error = error_of("nop\njmp short far\nnop\n.fill 200, 1, 0x90\nfar: hlt")
    assert (error.line, error.message) == (
        2,
        "invalid operand (a `short` jump reaches -128..+127 bytes)",
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[bits 8]", "`[bits 8]`: kvmlab reads `bits` as 16, 32 or 64 only"),
        ("[org 0x7c00]", "NASM's `[org 0x7c00]` is not supported: pass base=0x7c00 to assemble()"),
        ("org 0x7c00", "NASM's `org` is not supported: pass base=ADDRESS to assemble()"),
        ("dw 'hi'", "a string in `dw` is not supported: put text in `db`"),
        ("db", "missing operand"),
        (
            "times 4 nop",
            "kvmlab reads `times COUNT db VALUE` only: write `.rept COUNT` ... `.endr`",
        ),
        (
            "times 510-($-$$) db 0",
            "`$` in a `times` count is not supported (Keystone cannot size it): give a number",
        ),
        ("db `\\q`", "unknown escape `\\q` in a backquoted string"),
        (
            "%define X 1",
            "NASM's preprocessor is not supported: write `.set NAME, value` for `%define`",
        ),
        (
            ".data",
            "kvmlab assembles one flat block of bytes, so there are no sections: put data after"
            " the code (for example after `hlt`)",
        ),
    ],
)
def test_nasm_habits_get_a_hint(line: str, message: str) -> None:
    error = error_of(f"nop\n{line}")
    assert (error.line, error.message) == (2, message)


def test_unterminated_string_and_block_are_errors_on_their_line() -> None:
    assert (
        str(error_of('nop\n.ascii "abc'))
        == 'line 2: .ascii "abc : unterminated string: a closing " is missing'
    )
    assert str(error_of("nop\n.rept 3\nnop")) == "line 2: .rept 3 : `.rept` has no matching `.endr`"


def test_align_that_is_not_a_power_of_two_is_an_error() -> None:
    assert (
        error_of("nop\n.align 3").message
        == "`.align` takes a power of 2 (a number of bytes), not 3"
    )


def test_a_hanging_source_is_stopped_at_the_timeout_and_the_next_call_works() -> None:
    start = time.monotonic()
    error = error_of("nop\n.rept 100000000\nnop\n.endr\nhlt", timeout=0.5)
    assert time.monotonic() - start < 3  # one timeout for the source, one to find the line
    assert (error.line, error.message) == (
        2,
        "Keystone did not finish within 0.5 s, so kvmlab stopped it (a huge `.rept` or `.fill`?)",
    )
    assert assemble("hlt").code == b"\xf4"


def test_a_worker_that_died_is_replaced_on_the_next_call() -> None:
    assemble("nop")
    proc = WORKER._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert assemble("hlt").code == b"\xf4"
    assert WORKER._proc is not proc
