"""Bias expressions from the checked AST: the evaluator (`ir/values.py`) hands over every operation that
touches a score term. Biases are floats; masks and conditions stay out (`i > j` in a bias is an error: write
the condition as a mask).
"""
from __future__ import annotations

import math

from ...errors import PatternError
from .alibi import AlibiSlope, slopes
from .buckets import MAX_BUCKETS, MAX_DISTANCE, T5Bias
from .expr import FUNCS, Bin, Const, Fn, Neg, Term, Var

MAX_HEADS = 1 << 16
_MAGNITUDE = 1e30     # a constant in a bias stays well inside float32's range


def as_term(v, span, what: str = "a bias") -> Term:
    """A bias operand as a term: a term, or a number (ints and floats; a bool is not a number)."""
    if isinstance(v, Term):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not (math.isfinite(v) and abs(v) < _MAGNITUDE):
            raise PatternError(f"{v} is too large for {what} (constants stay below 1e30)", span)
        return Const(v)
    kind = "a condition" if isinstance(v, bool) or type(v).__name__ in ("Cmp", "Logic") else type(v).__name__
    raise PatternError(f"{what} is a number per pair, got {kind}", span,
                       hint="conditions and masks go in `over` (e.g. over where(i >= j)), not in a bias")


def score_unary(e, v: Term) -> Term:
    if e.op != "-":
        raise PatternError(f"`{e.op}` does not apply to a bias (a number)", e.span)
    return Neg(v)


def score_binary(e, a, b) -> Term:
    if e.op not in ("+", "-", "*", "/"):
        raise PatternError(f"`{e.op}` cannot be used in a bias", e.span,
                           hint="a bias takes + - * / abs min max alibi_slope t5_bias; conditions go in masks")
    return Bin(e.op, as_term(a, e.left.span), as_term(b, e.right.span))


def score_call(e, bound: dict, env, evaluate):
    """`abs`, `min`, `max` over terms; `alibi_slope(head, heads)`; `t5_bias(table, ...)`."""
    if e.func in FUNCS:
        args = [as_term(evaluate(bound[n]), bound[n].span) for n in (("x",) if e.func == "abs" else ("a", "b"))]
        if all(isinstance(a, Const) for a in args):
            vals = [a.value for a in args]
            return abs(vals[0]) if e.func == "abs" else (min(vals) if e.func == "min" else max(vals))
        return Fn(e.func, tuple(args))
    if e.func == "alibi_slope":
        return _alibi(bound, evaluate)
    return _t5(e, bound, env, evaluate)


def _int(bound, name, evaluate, low: int, high: int, what: str) -> int:
    v = evaluate(bound[name]) if name in bound else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise PatternError(f"{what} must be an int, got {type(v).__name__}", bound[name].span)
    if not low <= v <= high:
        raise PatternError(f"{what} must be in {low} .. {high}, got {v}", bound[name].span)
    return v


def _alibi(bound, evaluate):
    heads = _int(bound, "heads", evaluate, 1, MAX_HEADS, "the head count of alibi_slope")
    head = evaluate(bound["head"])
    if head == Var("h"):
        return AlibiSlope(heads)
    if isinstance(head, int) and not isinstance(head, bool) and 0 <= head < heads:
        return slopes(heads)[head]
    raise PatternError(f"alibi_slope's first argument is the head `h` (or a head 0 .. {heads - 1}), got "
                       f"{head.source() if isinstance(head, Term) else head!r}", bound["head"].span)


def _t5(e, bound, env, evaluate):
    name = bound["table"].id
    buckets = _int(bound, "buckets", evaluate, 2, MAX_BUCKETS, "buckets") if "buckets" in bound else 32
    max_distance = _int(bound, "max_distance", evaluate, 1, MAX_DISTANCE, "max_distance") \
        if "max_distance" in bound else 128
    bidirectional = evaluate(bound["bidirectional"]) if "bidirectional" in bound else True
    if not isinstance(bidirectional, bool):
        raise PatternError(f"bidirectional must be a bool, got {type(bidirectional).__name__}",
                           bound["bidirectional"].span)
    term = T5Bias(name, buckets, max_distance, bidirectional)
    if term.side < 2:
        raise PatternError(f"t5_bias needs at least {4 if bidirectional else 2} buckets, got {buckets}", e.span,
                           hint="T5 uses 32 buckets")
    if max_distance <= term.side // 2:
        raise PatternError(f"max_distance must exceed the {term.side // 2} exact buckets, got {max_distance}",
                           bound.get("max_distance", e).span, hint="T5 uses max_distance = 128")
    if name not in env.tables:
        raise PatternError(f"bias table '{name}' is used before its declaration", bound["table"].span,
                           hint=f"declare param {name}[heads, {buckets}] before this attend")
    width = env.tables[name][1]
    if width != buckets:
        raise PatternError(f"t5_bias reads {buckets} buckets but table '{name}' has {width} columns", e.span,
                           hint=f"declare param {name}[heads, {buckets}] or pass buckets = {width}")
    return term
