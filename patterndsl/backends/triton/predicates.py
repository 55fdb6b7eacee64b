"""Triton source text for `where` predicates: an `ops` object for `patterndsl.ir.predicate.evaluate`.

Triton's `//` and `%` truncate toward zero; the IR's floor like Python's (and divide-by-zero gives 0). The
ops emit floor-correct text: constant divisors fold into `((x % d) + d) % d` forms (plain `//` `%` where
the dividend is known >= 0), other divisors call the `_floordiv` / `_floormod` helpers that codegen.py
emits beside every mask. Constants fold; `and`/`or` with a constant side simplify.

>>> from patterndsl.ir import predicate as P
>>> evaluate = P.evaluate
>>> evaluate(P.Bin("%", P.Bin("-", P.I, P.J), P.Const(3)), Code("i64", nonneg=True), Code("j64", nonneg=True),
...          TRITON_OPS).text
'((((i64 - j64) % 3) + 3) % 3)'
"""
from __future__ import annotations

from dataclasses import dataclass

from ...ir.predicate import PYTHON_OPS

@dataclass(frozen=True)
class Code:
    """A fragment of Triton text: its value when it is a compile-time constant, and whether it is >= 0."""
    text: str
    const: int | bool | None = None
    nonneg: bool = False


def _c(v) -> Code:
    if isinstance(v, bool):
        return Code(str(v), v)
    return Code(str(v) if v >= 0 else f"({v})", v, v >= 0)


class TritonOps:
    """`evaluate` ops that build Triton source text with Python integer semantics (floor `//` and `%`,
    division by zero gives 0); constants fold, and plain `//` `%` are kept where both sides are >= 0."""

    def const(self, v):
        return _c(v)

    def bin(self, op, a: Code, b: Code) -> Code:
        if a.const is not None and b.const is not None:
            return _c(PYTHON_OPS.bin(op, int(a.const), int(b.const)))
        if op in "+-*":
            return Code(f"({a.text} {op} {b.text})", nonneg=op != "-" and a.nonneg and b.nonneg)
        if b.const == 0:
            return _c(0)
        if b.const is not None:
            d = abs(int(b.const))
            x = a.text if b.const > 0 else f"(-{a.text})"
            if a.nonneg and b.const > 0:
                return Code(f"({x} {op} {d})", nonneg=True)
            mod = f"((({x} % {d}) + {d}) % {d})"
            if op == "%":
                return Code(mod if b.const > 0 else f"(-{mod})", nonneg=b.const > 0)
            return Code(f"(({x} - {mod}) // {d})")
        fn = "_floordiv" if op == "//" else "_floormod"
        return Code(f"{fn}({_tensor(a)}, {b.text})")

    def call(self, func, args):
        if all(a.const is not None for a in args):
            return _c(PYTHON_OPS.call(func, [int(a.const) for a in args]))
        if func == "abs":
            return Code(f"tl.abs({args[0].text})", nonneg=True)
        a, b = args
        if a.const is not None:
            a, b = b, a
        nonneg = (a.nonneg and b.nonneg) if func == "min" else (a.nonneg or b.nonneg)
        return Code(f"tl.{'minimum' if func == 'min' else 'maximum'}({a.text}, {_tensor(b)})", nonneg=nonneg)

    def cmp(self, op, a: Code, b: Code) -> Code:
        if a.const is not None and b.const is not None:
            return _c(PYTHON_OPS.cmp(op, a.const, b.const))
        return Code(f"({a.text} {op} {b.text})")

    def logic(self, op, a: Code, b: Code | None = None) -> Code:
        if op == "not":
            return _c(not a.const) if a.const is not None else Code(f"(~{a.text})")
        for x, y in ((a, b), (b, a)):
            if x.const is not None:
                if bool(x.const) == (op == "and"):
                    return y           # true and y, false or y
                return _c(op == "or")  # false and y, true or y
        return Code(f"({a.text} {'&' if op == 'and' else '|'} {b.text})")


def _tensor(x: Code) -> str:
    """A constant as an int64 tensor broadcastable with the indices (Triton helpers want tensors)."""
    return f"(zero64 + {x.text})" if x.const is not None else x.text


TRITON_OPS = TritonOps()
