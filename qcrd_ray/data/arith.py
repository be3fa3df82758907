"""A safe evaluator for arithmetic equations such as SVAMP labels ``( ( 17.0 + 15.0 ) + 2.0 )``.

Never ``eval``: the text is parsed with :mod:`ast` and only numeric literals, parentheses, unary +/- and the
binary operators + - * / // % ** are walked. Every intermediate value is a float bounded by ``MAX_ABS`` and
exponents by ``MAX_EXPONENT``, so hostile input (``9**9**9``, names, calls, 10 000 nested parentheses) fails fast
with :class:`ArithError` instead of hanging, allocating or executing anything.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 1000
MAX_ABS = 1e15
MAX_EXPONENT = 64


class ArithError(ValueError):
    """The text is not a safe, bounded arithmetic expression."""


class DivisionByZero(ArithError):
    """The expression divides by zero (a wrong answer, not a crash)."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _bounded(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_ABS:
        raise ArithError(f"value out of range (|x| <= {MAX_ABS:g})")
    return value


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ArithError(f"not a number: {node.value!r}")
        try:
            return _bounded(float(node.value))
        except OverflowError as e:  # an int literal too large for a float
            raise ArithError("number out of range") from e
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        op = type(node.op)
        if op in (ast.Div, ast.FloorDiv, ast.Mod) and right == 0:
            raise DivisionByZero("division by zero")
        if op is ast.Pow:
            if abs(right) > MAX_EXPONENT:
                raise ArithError(f"exponent out of range (|e| <= {MAX_EXPONENT})")
            if left == 0 and right < 0:
                raise DivisionByZero("zero to a negative power")
            if left < 0 and not right.is_integer():
                raise ArithError("fractional power of a negative number")
        try:
            return _bounded(_BINARY[op](left, right))
        except OverflowError as e:
            raise ArithError("value out of range") from e
    raise ArithError(f"not allowed in an equation: {type(node).__name__}")


def safe_eval(expr: str) -> float:
    """The value of an arithmetic expression; raises :class:`ArithError` (or :class:`DivisionByZero`)."""
    if not isinstance(expr, str):
        raise ArithError(f"expected a string, got {type(expr).__name__}")
    if len(expr) > MAX_CHARS:
        raise ArithError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ArithError(f"not an arithmetic expression: {expr[:80]!r}") from e
    try:
        return _walk(tree.body)
    except RecursionError as e:
        raise ArithError("expression nested too deeply") from e
