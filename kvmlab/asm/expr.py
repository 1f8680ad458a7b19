"""Integer expressions as Keystone reads them, so kvmlab can check what Keystone encoded.

Numbers follow Keystone: `0x1f`, `1fh`, `0b101`, `'A'`, decimal, and a leading 0 means octal
(`010` is 8). Symbols come from a dict; anything else (a register, `1b`) makes the expression
unknown, never wrong.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH](?![\w.$])|[0-9]+)
    | (?P<chr>'(?:\\.|[^'\\])')
    | (?P<name>[A-Za-z_.$][\w.$]*)
    | (?P<op><<|>>|[-+*/%&|^~()])
    )""",
    re.VERBOSE,
)
_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}
_UNARY: dict[type, Callable[[int], int]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
}
OCTAL = re.compile(r"(?<![\w.$'])0[0-7]+(?![\w.$])")


def number(text: str) -> int | None:
    """The value of one numeric literal in Keystone's syntax, or None if it is not one."""
    lowered = text.lower()
    try:
        if lowered.startswith(("0x", "0b")):
            return int(lowered, 0)
        if lowered.endswith("h"):
            return int(lowered[:-1], 16)
        return int(lowered, 8) if len(lowered) > 1 and lowered.startswith("0") else int(lowered)
    except ValueError:
        return None


def tokens(text: str) -> list[tuple[str, str]] | None:
    """The (kind, text) pairs of an expression (num, chr, name, op); None if it holds others."""
    found, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if match is None:
            return None
        kind = match.lastgroup
        assert kind is not None
        found.append((kind, match.group(kind)))
        pos = match.end()
    return found


def names(text: str) -> list[str]:
    """The identifiers in `text`, in order (registers and keywords included: the caller filters)."""
    return [match.group("name") for match in _TOKEN.finditer(text) if match.group("name")]


def evaluate(text: str, symbols: Mapping[str, int]) -> int | None:
    """The value of the expression `text`, or None if it is not a constant over `symbols`."""
    parts = tokens(text)
    if not parts or _ambiguous(parts):
        return None
    python = []
    for kind, word in parts:
        if kind == "num":
            value = number(word)
            if value is None:
                return None
            python.append(str(value))
        elif kind == "chr":
            python.append(str(ord(ast.literal_eval(word))))
        elif kind == "name":
            if word not in symbols:
                return None
            python.append(f"({symbols[word]})")
        else:
            python.append("//" if word == "/" else word)
    try:
        return _eval(ast.parse(" ".join(python), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError):
        return None


def _ambiguous(parts: list[tuple[str, str]]) -> bool:
    """True if the value depends on whose precedence applies. Keystone's directives (GNU) put
    `<<` with `*` and `&`, `|`, `^` on one level; its Intel operands follow C, as Python does."""
    levels: list[set[str]] = [set()]
    previous = "op"
    for kind, word in parts:
        if word == "(":
            levels.append(set())
        elif word == ")" and len(levels) > 1:
            levels.pop()
        elif kind == "op" and word != "~" and previous != "op":  # a binary operator
            levels[-1].add(word)
        previous = "value" if word == ")" else kind
        if len(levels[-1] & {"&", "|", "^"}) > 1 or (
            levels[-1] & {"<<", ">>"} and levels[-1] & {"+", "-", "*", "/", "%"}
        ):
            return True
    return False


def _eval(node: ast.expr) -> int:
    """Evaluate a tree that holds only integers and the operators above."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ValueError("not an integer expression")
