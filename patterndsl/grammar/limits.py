"""The language's numeric limits, and the checks that keep every value inside what the backends evaluate exactly.

docs/language.md §7 ("Limits") states them for users; this module is where they live:

- `MAX_DEPTH`: expressions nest at most 200 levels (`nesting.py` says what a level is).
- `INT_LIMIT`: every compile-time integer (a literal, a parameter value, a computed value, a set element, a
  band's reach `width * dilation`) has magnitude below 2^40.
- `POSITION_LIMIT`: query and key positions `i`, `j` are below 2^31 (every sequence a backend can run).
- `WHERE_LIMIT`: inside `where(...)`, no intermediate value may reach 2^63 for any such positions, so the
  64-bit integer arithmetic of every backend is exact; `where` takes integers where it computes and
  conditions where it combines (a bool is not an integer).
- `FEATURE_LIMIT`: a feature map draws at most 2^16 random features.
- Floats are finite 64-bit numbers: a literal that overflows (`1e999`) or underflows to 0 (`1e-999`) is an
  error, and so is a non-finite value given at compile time.

>>> int_literal("42", Span(1, 1))
42
>>> where_bounds_text(2 ** 62)
'2^62.0'
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable

from ..errors import PatternError, Span
from ..ir.predicate import POSITION_LIMIT, WHERE_LIMIT, range_bin, range_call
from . import ast

MAX_DEPTH = 200           # levels an expression may nest (see nesting.py for what a level is)
INT_LIMIT = 1 << 40
FEATURE_LIMIT = 1 << 16   # random features of a favor(...) or relu(...) feature map
_LIMITS_DOC = "see 'Limits' in docs/language.md"


# ------------------------------------------------------------------------------------------------- literals
def int_literal(text: str, span: Span) -> int:
    """The value of an integer literal (ASCII digits), or a PatternError at it when it reaches `INT_LIMIT`.
    Long literals are refused before conversion (Python refuses to convert more than 4300 digits)."""
    digits = text.lstrip("0") or "0"
    if len(digits) <= len(str(INT_LIMIT)) and int(digits) < INT_LIMIT:
        return int(digits)
    shown = text if len(text) <= 30 else f"of {len(text)} digits"
    raise PatternError(f"integer {shown} is too large: integers stay below 2^40 = {INT_LIMIT}", span,
                       hint=_LIMITS_DOC)


def float_literal(text: str, span: Span) -> float:
    """The value of a float literal, or a PatternError at it when it is not a finite nonzero float64 (unless
    it is written as zero)."""
    value = float(text)
    if math.isinf(value):
        raise PatternError(f"number {_short(text)} is too large for a 64-bit float (the largest is about 1.8e308)",
                           span, hint=_LIMITS_DOC)
    if value == 0.0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
        raise PatternError(f"number {_short(text)} is too small for a 64-bit float: it would be 0", span,
                           hint="write 0 if you mean it, else a number above about 2.2e-308")
    return value


def _short(text: str) -> str:
    return text if len(text) <= 30 else text[:12] + "..." + text[-12:]


# ------------------------------------------------------------------------------------ compile-time values
def check_param(name: str, type_: str, value, span: Span) -> None:
    """A parameter value given at compile time: integers (and set elements) below `INT_LIMIT`, floats finite."""
    if type_ == "int" and abs(value) >= INT_LIMIT:
        raise PatternError(f"parameter '{name}' is {value}, too large: integers stay below 2^40 = {INT_LIMIT}",
                           span, hint=_LIMITS_DOC)
    if type_ == "float" and not math.isfinite(value):
        raise PatternError(f"parameter '{name}' must be a finite number, got {value}", span, hint=_LIMITS_DOC)
    if type_ == "set":
        big = [x for x in value if x >= INT_LIMIT]
        if big:
            raise PatternError(f"parameter '{name}' holds {max(big)}, too large: token indices stay below 2^40",
                               span, hint=_LIMITS_DOC)


def check_ranges(exprs: Iterable[ast.Expr | None], values: dict, value_of: Callable[[ast.Expr], object]) -> None:
    """Raise a PatternError at the first place in `exprs` (evaluated expressions) where a value leaves what
    the backends compute exactly: a band reaching `INT_LIMIT`, a FAVOR+ `eps` above 1, or a `where(...)` that
    mixes conditions and integers or whose arithmetic may reach `WHERE_LIMIT`. `values` holds the parameters
    and named values; `value_of` evaluates a compile-time subexpression (an `if` condition, an argument)."""
    stack = [e for e in exprs if e is not None][::-1]
    while stack:
        e = stack.pop()
        if isinstance(e, ast.Call):
            if e.func == "where":
                body = e.args[0] if e.args else e.kwargs[0].value
                _Where(values, value_of).check(body)
                continue
            if e.func in ("sliding", "window"):
                _check_band(e, value_of)
            if e.func == "favor":
                _check_eps(e, value_of)
            stack.extend(list(e.args) + [k.value for k in e.kwargs])
        elif isinstance(e, ast.BinOp):
            stack.extend((e.right, e.left))
        elif isinstance(e, ast.UnaryOp):
            stack.append(e.operand)
        elif isinstance(e, ast.IfExpr):
            stack.append(e.then if value_of(e.cond) is True else e.other)


_BAND_ARGS = {"sliding": ("width", "dilation"), "window": ("before", "after", "dilation")}


def _check_band(call: ast.Call, value_of) -> None:
    names = _BAND_ARGS[call.func]
    given = dict(zip(names, call.args)) | {k.name: k.value for k in call.kwargs}
    vals = {n: value_of(given[n]) if n in given else 1 for n in names}
    reach = max(vals[n] for n in names if n != "dilation") * vals["dilation"]
    if reach >= INT_LIMIT:
        raise PatternError(f"{call.func}(...) reaches {reach} positions (its size times its dilation), "
                           f"too far: positions stay below 2^40", call.span, hint=_LIMITS_DOC)


def _check_eps(call: ast.Call, value_of) -> None:
    given = [k.value for k in call.kwargs if k.name == "eps"] + list(call.args[3:4])
    if given and value_of(given[0]) > 1:
        raise PatternError(f"eps must be at most 1, got {value_of(given[0])}", given[0].span,
                           hint="eps is a small constant added to every feature (default 1e-4); a large one "
                                "swamps the features and overflows their sums")


# --------------------------------------------------------------------------------------------- where(...)
_ORDER = ("<", "<=", ">", ">=", "==", "!=")


class _Where:
    """Types and integer ranges of a `where` body, bottom-up without recursion: each integer subexpression
    gets an interval (lo, hi) of Python ints holding every value it takes for positions in
    [0, POSITION_LIMIT); a condition gets None."""

    def __init__(self, values: dict, value_of):
        self.values = values
        self.value_of = value_of

    def check(self, body: ast.Expr) -> None:
        done: dict[int, tuple | None] = {}
        stack: list[tuple[ast.Expr, bool]] = [(body, False)]
        while stack:
            e, ready = stack.pop()
            kids = self._children(e)
            if not ready:
                stack.append((e, True))
                stack.extend((k, False) for k in reversed(kids))
                continue
            r = self._range(e, [done[id(k)] for k in kids])
            if r is not None and max(-r[0], r[1]) >= WHERE_LIMIT:
                raise PatternError(f"this value can reach {where_bounds_text(max(-r[0], r[1]))} for positions "
                                   f"below 2^31, beyond the 64-bit integers where(...) is computed in", e.span,
                                   hint="keep products of positions and large constants small; " + _LIMITS_DOC)
            done[id(e)] = r

    def _children(self, e: ast.Expr) -> list:
        if isinstance(e, ast.UnaryOp):
            return [e.operand]
        if isinstance(e, ast.BinOp):
            return [e.left, e.right]
        if isinstance(e, ast.Call):
            return list(e.args) + [k.value for k in e.kwargs]
        if isinstance(e, ast.IfExpr):  # a compile-time choice: only the branch taken is computed
            return [e.then if self.value_of(e.cond) is True else e.other]
        return []

    def _range(self, e: ast.Expr, rs: list):
        if isinstance(e, ast.Num):
            return (e.value, e.value)
        if isinstance(e, ast.Bool):
            return None
        if isinstance(e, ast.Name):
            return self._name(e)
        if isinstance(e, ast.IfExpr):
            return rs[0]
        if isinstance(e, ast.UnaryOp):
            if e.op == "not":
                return self._cond(e.operand, rs[0], "not")
            lo, hi = self._int(e.operand, rs[0], "-")
            return (-hi, -lo)
        if isinstance(e, ast.Call):
            return self._call(e, rs)
        if isinstance(e, ast.BinOp):
            return self._binary(e, *rs)
        return (0, 0)  # a string or set compared at compile time; the evaluator refused anything else

    def _name(self, e: ast.Name):
        if e.id not in self.values:
            return (0, POSITION_LIMIT - 1)  # i or j
        v = self.values[e.id]
        if isinstance(v, bool):
            return None
        return (v, v) if isinstance(v, (int, float)) else (0, 0)

    def _call(self, e: ast.Call, rs: list):
        args = list(e.args) + [k.value for k in e.kwargs]
        return range_call(e.func, [self._int(a, r, e.func) for a, r in zip(args, rs)])

    def _binary(self, e: ast.BinOp, ra, rb):
        if e.op in ("and", "or"):
            return self._cond(e.left, ra, e.op) or self._cond(e.right, rb, e.op)
        if e.op in ("==", "!=") and ra is None and rb is None:
            return None  # two conditions compared: fine
        a, b = self._int(e.left, ra, e.op), self._int(e.right, rb, e.op)
        if e.op in _ORDER:
            return None
        return range_bin(e.op, a, b)

    def _int(self, e: ast.Expr, r, op: str) -> tuple:
        if r is None:
            got = "a bool" if isinstance(e, (ast.Bool, ast.Name)) else "a condition"
            raise PatternError(f"`{op}` takes integers inside where(...), got {got}", e.span,
                               hint="a bool is not an integer; combine conditions with and, or, not")
        return r

    def _cond(self, e: ast.Expr, r, op: str) -> None:
        if r is not None:
            raise PatternError(f"`{op}` takes conditions inside where(...), got an integer", e.span,
                               hint="compare it, e.g. x != 0")
        return None


def where_bounds_text(m: int) -> str:
    """A magnitude as a power of two, for messages: 2^62.0, 2^93.2."""
    return f"2^{math.log2(m):.1f}" if m > 0 else "0"
