"""Bias expressions: float-valued trees over the query position `i`, the key position `j` and the head `h`.

A bias is additive to the score of pair (i, j) on head h. Its nodes carry their one pointwise definition,
`at(ops)`, written against an `ops` object (`ir/scores/ops.py` for torch; `export/flex.py`, Triton codegen),
and their `.attn` spelling, `source()`. Positions and heads are integers; arithmetic with a float gives a
float; `/` is true division, and division by zero gives 0 (so every bias is total and finite).

>>> e = Bin("*", Const(-0.5), Fn("abs", (Bin("-", Var("i"), Var("j")),)))
>>> e.source()
'(-0.5) * abs(i - j)'
"""
from __future__ import annotations

from dataclasses import dataclass

VARS = ("i", "j", "h")
FUNCS = ("abs", "min", "max")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class Term:
    """A node of a bias expression (subclasses define `at(ops)` and `source()`)."""

    def at(self, ops):
        raise NotImplementedError

    def source(self) -> str:
        raise NotImplementedError

    def tables(self) -> tuple[str, ...]:
        """The learned tables (`param NAME[heads, buckets]`) the expression reads."""
        return ()

    def prec(self) -> int:
        return 9

    def flops(self) -> int:
        """Arithmetic operations per pair (the cost model's count; a leaf costs nothing)."""
        return 0


@dataclass(frozen=True)
class Var(Term):
    """`i` (absolute query position), `j` (key position) or `h` (head index, counting from 0 over all heads)."""
    name: str

    def at(self, ops):
        return ops.var(self.name)

    def source(self) -> str:
        return self.name


@dataclass(frozen=True)
class Const(Term):
    value: float | int

    def at(self, ops):
        return ops.const(self.value)

    def source(self) -> str:
        return repr(self.value) if isinstance(self.value, float) else str(self.value)

    def prec(self) -> int:
        return 9 if self.value >= 0 else 0


@dataclass(frozen=True)
class Bin(Term):
    """`a + b`, `a - b`, `a * b`, `a / b` (true division; by zero: 0)."""
    op: str
    a: Term
    b: Term

    def at(self, ops):
        return ops.bin(self.op, self.a.at(ops), self.b.at(ops))

    def source(self) -> str:
        p = _PREC[self.op]
        left = self.a.source() if self.a.prec() >= p else f"({self.a.source()})"
        right = self.b.source() if self.b.prec() > p else f"({self.b.source()})"
        return f"{left} {self.op} {right}"

    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.a.tables() + self.b.tables()))

    def prec(self) -> int:
        return _PREC[self.op]

    def flops(self) -> int:
        return 1 + self.a.flops() + self.b.flops()


@dataclass(frozen=True)
class Fn(Term):
    """`abs(x)`, `min(a, b)`, `max(a, b)`."""
    func: str
    args: tuple[Term, ...]

    def at(self, ops):
        return ops.call(self.func, [a.at(ops) for a in self.args])

    def source(self) -> str:
        return f"{self.func}({', '.join(a.source() for a in self.args)})"

    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for a in self.args for t in a.tables()))

    def flops(self) -> int:
        return 1 + sum(a.flops() for a in self.args)


@dataclass(frozen=True)
class Neg(Term):
    """`-x`."""
    x: Term

    def at(self, ops):
        return ops.bin("-", 0, self.x.at(ops))

    def source(self) -> str:
        return f"-{self.x.source()}" if self.x.prec() >= 2 else f"-({self.x.source()})"

    def tables(self) -> tuple[str, ...]:
        return self.x.tables()

    def flops(self) -> int:
        return 1 + self.x.flops()

    def prec(self) -> int:
        return 2


def uses(t: Term) -> set[str]:
    """The variables (`i`, `j`, `h`) a term reads."""
    if isinstance(t, Var):
        return {t.name}
    kids = (t.a, t.b) if isinstance(t, Bin) else (t.x,) if isinstance(t, Neg) else getattr(t, "args", ())
    out = set(getattr(t, "reads", ()))
    for k in kids:
        out |= uses(k)
    return out
