"""Predicates over the query index `i` and key index `j` (the body of `where(...)`), and their evaluation.

A predicate is a small expression tree with Python integer semantics: `//` floors and `%` takes the sign of
the divisor (as in Python and `torch.div(..., rounding_mode="floor")` / `torch.remainder`). Division or
remainder by zero gives 0, so every predicate is total. One evaluator serves every target: `evaluate` takes an
`ops` object, so the same tree becomes a torch tensor (dense masks, tile checks), a FlexAttention `mask_mod`
body, or Triton source text.

>>> p = Cmp("<=", Call("abs", (Bin("-", I, J),)), Const(2))
>>> str(p)
'abs(i - j) <= 2'
>>> import torch
>>> evaluate(p, torch.arange(4)[:, None], torch.arange(4)[None, :], TORCH_OPS).int().tolist()[0]
[1, 1, 1, 0]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Var:
    name: str  # "i" or "j"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Const:
    value: int | bool

    def __str__(self) -> str:
        return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)


@dataclass(frozen=True)
class Bin:
    """Integer arithmetic: + - * // %."""
    op: str
    a: "Pred"
    b: "Pred"

    def __str__(self) -> str:
        return f"{_paren(self.a, self)} {self.op} {_paren(self.b, self, right=True)}"


@dataclass(frozen=True)
class Call:
    """abs(x), min(a, b), max(a, b)."""
    func: str
    args: tuple["Pred", ...]

    def __str__(self) -> str:
        return f"{self.func}({', '.join(map(str, self.args))})"


@dataclass(frozen=True)
class Cmp:
    op: str  # < <= > >= == !=
    a: "Pred"
    b: "Pred"

    def __str__(self) -> str:
        return f"{_paren(self.a, self)} {self.op} {_paren(self.b, self, right=True)}"


@dataclass(frozen=True)
class Logic:
    """and / or over two predicates; not over one (b is None)."""
    op: str
    a: "Pred"
    b: "Pred | None" = None

    def __str__(self) -> str:
        if self.op == "not":
            return f"not {_paren(self.a, self)}"
        return f"{_paren(self.a, self)} {self.op} {_paren(self.b, self, right=True)}"


Pred = Union[Var, Const, Bin, Call, Cmp, Logic]
I, J = Var("i"), Var("j")

_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 5, "-": 5, "*": 6, "//": 6, "%": 6}


def _prec(p: Pred) -> int:
    if isinstance(p, Logic):
        return _PREC[p.op]
    if isinstance(p, Cmp):
        return _PREC["cmp"]
    if isinstance(p, Bin):
        return _PREC[p.op]
    return 10


def _paren(child: Pred, parent: Pred, right: bool = False) -> str:
    c, q = _prec(child), _prec(parent)
    return f"({child})" if c < q or (right and c == q) else str(child)


def uses(p: Pred) -> set[str]:
    """The index variables a predicate reads."""
    if isinstance(p, Var):
        return {p.name}
    if isinstance(p, Const):
        return set()
    kids = p.args if isinstance(p, Call) else tuple(x for x in (p.a, p.b) if x is not None)
    return set().union(*(uses(k) for k in kids)) if kids else set()


# --------------------------------------------------------------------------------------------- evaluation
class TorchOps:
    """Evaluate predicates on integer tensors (broadcasting), giving bool tensors."""

    def const(self, v):
        return v

    def bin(self, op, a, b):
        import torch
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        a_t, b_t = torch.as_tensor(a), torch.as_tensor(b)
        safe = torch.where(b_t == 0, torch.ones_like(b_t), b_t)
        r = torch.div(a_t, safe, rounding_mode="floor") if op == "//" else torch.remainder(a_t, safe)
        return torch.where(b_t == 0, torch.zeros_like(r), r)

    def call(self, func, args):
        import torch
        if func == "abs":
            return torch.as_tensor(args[0]).abs()
        fn = torch.minimum if func == "min" else torch.maximum
        return fn(torch.as_tensor(args[0]), torch.as_tensor(args[1]))

    def cmp(self, op, a, b):
        import torch
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge,
                "==": torch.eq, "!=": torch.ne}[op](a, b)

    def logic(self, op, a, b=None):
        import torch
        a = torch.as_tensor(a, dtype=torch.bool) if not hasattr(a, "dtype") or a.dtype != torch.bool else a
        if op == "not":
            return ~a
        b = torch.as_tensor(b, dtype=torch.bool) if not hasattr(b, "dtype") or b.dtype != torch.bool else b
        return (a & b) if op == "and" else (a | b)


class PythonOps:
    """Evaluate predicates on Python ints (one pair at a time; used for tests and scalar checks)."""

    def const(self, v):
        return v

    def bin(self, op, a, b):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if b == 0:
            return 0
        return a // b if op == "//" else a % b

    def call(self, func, args):
        return abs(args[0]) if func == "abs" else (min(args) if func == "min" else max(args))

    def cmp(self, op, a, b):
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]

    def logic(self, op, a, b=None):
        return (not a) if op == "not" else ((a and b) if op == "and" else (a or b))


POSITION_LIMIT = 1 << 31  # query and key positions are below this (every sequence a backend can run)
WHERE_LIMIT = 1 << 63     # no intermediate value of a predicate may reach this: 64-bit arithmetic stays exact


def range_bin(op: str, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """An interval holding `x op y` for every x in a and y in b (Python ints; exact for + - *, sound for the
    floor division and remainder, where x // 0 == x % 0 == 0)."""
    if op == "+":
        return (a[0] + b[0], a[1] + b[1])
    if op == "-":
        return (a[0] - b[1], a[1] - b[0])
    if op == "*":
        corners = [x * y for x in a for y in b]
        return (min(corners), max(corners))
    if b[0] == b[1]:
        c = b[0]
        if c == 0:
            return (0, 0)
        if op == "//":
            ends = (a[0] // c, a[1] // c)
            return (min(ends), max(ends))
        return (0, c - 1) if c > 0 else (c + 1, 0)
    m = max(abs(b[0]), abs(b[1]))
    if op == "//":
        top = max(abs(a[0]), abs(a[1]))
        return (-top, top)
    return (-(m - 1), m - 1)


def range_call(func: str, args: list[tuple[int, int]]) -> tuple[int, int]:
    """An interval holding `abs`, `min` or `max` of values in the argument intervals."""
    if func == "abs":
        (lo, hi), = args
        return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    pick = min if func == "min" else max
    return (pick(r[0] for r in args), pick(r[1] for r in args))


class RangeOps:
    """Evaluate predicates on integer intervals (Python ints), recording the largest magnitude any
    intermediate value can take in `peak`; conditions evaluate to None."""

    def __init__(self):
        self.peak = 0

    def _seen(self, r):
        if r is not None:
            self.peak = max(self.peak, -r[0], r[1])
        return r

    def const(self, v):
        return None if isinstance(v, bool) else self._seen((v, v))

    def bin(self, op, a, b):
        return self._seen(range_bin(op, a or (0, 1), b or (0, 1)))  # a number used as a condition is 0 or 1

    def call(self, func, args):
        return self._seen(range_call(func, [r or (0, 1) for r in args]))

    def cmp(self, op, a, b):
        return None

    def logic(self, op, a, b=None):
        return None


def peak_magnitude(p: Pred) -> int:
    """The largest magnitude an intermediate value of `p` can reach for positions in [0, POSITION_LIMIT).

    >>> peak_magnitude(Cmp("<", Bin("*", I, J), Const(3)))
    4611686014132420609
    """
    ops = RangeOps()
    whole = (0, POSITION_LIMIT - 1)
    evaluate(p, ops._seen(whole), whole, ops)
    return ops.peak


TORCH_OPS = TorchOps()
PYTHON_OPS = PythonOps()


def evaluate(p: Pred, i, j, ops=TORCH_OPS):
    """Evaluate `p` with index values `i`, `j` (tensors, ints, or anything `ops` understands)."""
    if isinstance(p, Var):
        return i if p.name == "i" else j
    if isinstance(p, Const):
        return ops.const(p.value)
    if isinstance(p, Bin):
        return ops.bin(p.op, evaluate(p.a, i, j, ops), evaluate(p.b, i, j, ops))
    if isinstance(p, Call):
        return ops.call(p.func, [evaluate(a, i, j, ops) for a in p.args])
    if isinstance(p, Cmp):
        return ops.cmp(p.op, evaluate(p.a, i, j, ops), evaluate(p.b, i, j, ops))
    if isinstance(p, Logic):
        a = evaluate(p.a, i, j, ops)
        return ops.logic(p.op, a, None if p.b is None else evaluate(p.b, i, j, ops))
    raise TypeError(f"not a predicate node: {p!r}")
