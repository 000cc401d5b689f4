"""The chat's calculator tool: arithmetic on numbers, never `eval`.

The model writes the expression, so whoever steers the model (a prompt injection in a document
too) writes it: it is parsed with `ast` and walked here, allowing only numbers, + - * / // % **
and parentheses. Each bound keeps one evaluation cheap whatever the expression: its length, the
size of every number (literal or intermediate), and a power's exponent and result size, checked
before the power is computed, so `9**9**9` is refused rather than computed.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**100  # every number met on the way, literal or intermediate
MAX_EXPONENT = 1000
MAX_RESULT_DIGITS = 100  # a power's result, estimated from its operands before computing it

Number = int | float

BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


class CalculationError(ValueError):
    """The expression is not arithmetic, or exceeds a bound; the message says which."""


def calculate(expression: str) -> Number:
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"The expression is longer than {MAX_EXPRESSION_CHARS} characters.")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculationError("Not an arithmetic expression.") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        # bool is an int to Python, complex a number: neither is arithmetic here.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculationError(f"Only numbers are allowed, not {value!r}.")
        return _bounded(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        if type(node.op) in BINARY:
            try:
                return _bounded(BINARY[type(node.op)](left, right))
            except ZeroDivisionError:
                raise CalculationError("Division by zero.") from None
            except OverflowError:
                raise CalculationError("The result is too large.") from None
    raise CalculationError(f"Only numbers, parentheses and + - * / // % ** are allowed, "
                           f"not {type(node).__name__}.")


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculationError(f"Exponents are limited to {MAX_EXPONENT} either way.")
    if base != 0 and exponent > 0 and exponent * math.log10(abs(base)) > MAX_RESULT_DIGITS:
        raise CalculationError(f"The result would have more than {MAX_RESULT_DIGITS} digits.")
    try:
        result = base**exponent
    except ZeroDivisionError:
        raise CalculationError("Zero cannot be raised to a negative power.") from None
    except OverflowError:
        raise CalculationError("The result is too large.") from None
    if isinstance(result, complex):  # a negative number to a fractional power
        raise CalculationError("The result is not a real number.")
    return result


def _bounded(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationError("The result is not a finite number.")
    if abs(value) > MAX_ABS_VALUE:
        raise CalculationError("Numbers are limited to 10**100 in size.")
    return value


def formatted(value: Number) -> str:
    """An integer exactly; a float with up to 15 significant digits (what a double holds)."""
    return str(value) if isinstance(value, int) else f"{value:.15g}"
