"""AST of `.attn` programs: frozen dataclasses that carry their source span (spans never affect equality).

The parser builds these; `checks.py` verifies them; `printer.py` prints them back; `ir/lower.py` lowers them.
Expressions are untyped here: one expression grammar covers ints, floats, bools, strings, sets, masks,
feature maps and normalisers, and the checker gives every node its type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..errors import Span

_NOSPAN = Span(0, 0)


def _span() -> Span:
    return field(default=_NOSPAN, compare=False, repr=False)


# ----------------------------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Num:
    """An int or float literal (`3`, `0.5`, `1e-4`)."""
    value: int | float
    span: Span = _span()


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    """A parameter, a stage, a nullary primitive (`full`, `causal`, `softmax`, `elu1`), `i`/`j` in `where`."""
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class SetLit:
    """`{0, 5, 9}`: a set of token indices."""
    items: tuple["Expr", ...]
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    """`name = value` inside a call."""
    name: str
    value: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """`sliding(w, dilation = 2)`, `favor(256, orthogonal = true)`, `linear(elu1)`, `where(i >= j)`."""
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class BinOp:
    """Arithmetic (`+ - * / // %`), mask algebra (`| & -`), comparison (`< <= > >= == !=`), `and`, `or`."""
    op: str
    left: "Expr"
    right: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class UnaryOp:
    """`-x` (negation), `~m` (mask complement), `not b`."""
    op: str
    operand: "Expr"
    span: Span = _span()


@dataclass(frozen=True)
class IfExpr:
    """`if cond then a else b`: conditional choice on a compile-time bool."""
    cond: "Expr"
    then: "Expr"
    other: "Expr"
    span: Span = _span()


Expr = Union[Num, Bool, Str, Name, SetLit, Call, BinOp, UnaryOp, IfExpr]


# ------------------------------------------------------------------------------------------------ statements
@dataclass(frozen=True)
class Option:
    """`, causal = true` / `, scale = 0.125` after an attend."""
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class HeadRange:
    """`heads[a:b]`: the stage runs on heads a .. b-1."""
    start: Expr
    stop: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Attend:
    """`[heads[a:b]] attend NORMALISER [query SRC] [keys SRC] [over MASK] {, option = value}`.

    `query`/`keys` name a source: `input`, a learned `param`, or an earlier stage; None means `input`.
    Keys and values come from the same source. `mask` None means `full`.
    """
    normaliser: Expr
    query: Name | None = None
    keys: Name | None = None
    mask: Expr | None = None
    options: tuple[Option, ...] = ()
    heads: HeadRange | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Let:
    """`name = attend ...` (a named stage) or `name = expr` (a named value, e.g. a mask)."""
    name: str
    value: Union[Attend, Expr]
    span: Span = _span()


@dataclass(frozen=True)
class TensorParam:
    """`param p[length]`: a learned tensor of `length` rows (Luna's packed queries), given at call time;
    `param t[heads, width]`: a learned bias table `[heads, width]` (read by `t5_bias`)."""
    name: str
    length: Expr
    span: Span = _span()
    width: Expr | None = None


@dataclass(frozen=True)
class Return:
    """`return out, packed`."""
    names: tuple[Name, ...]
    span: Span = _span()


Stmt = Union[Attend, Let, TensorParam, Return]


# --------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Param:
    """`name: type [in {choices}] [= default]`; type is one of int, float, bool, set, str."""
    name: str
    type: str
    default: Expr | None = None
    span: Span = _span()
    choices: tuple[Expr, ...] | None = None


@dataclass(frozen=True)
class Pattern:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Module:
    """A parsed `.attn` file: one or more patterns. `source` is kept for error rendering, not equality."""
    patterns: tuple[Pattern, ...]
    source: object = field(default=None, compare=False, repr=False)


PARAM_TYPES = ("int", "float", "bool", "set", "str")
