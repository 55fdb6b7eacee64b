"""Interval arithmetic for `where` predicates: whether a predicate is surely true, surely false or either on a tile.

`i` and `j` range over intervals (one per tile, as tensors); integer expressions evaluate to intervals that
contain every value they can take there, comparisons and logic to a pair (can be true, can be false). The
result is sound, never exact by promise: a tile called surely true holds only allowed pairs, a tile called
surely false none, and "either" tiles are left for the caller to settle (e.g. by evaluating their pairs).
Bounds are float64 with ±inf for "unbounded", so large intermediate products cannot overflow.

>>> import torch
>>> from patterndsl.ir.predicate import Bin, Call, Cmp, Const, I, J, evaluate
>>> near = Cmp("<=", Call("abs", (Bin("-", I, J),)), Const(4))      # abs(i - j) <= 4
>>> i = Interval(torch.tensor([0., 0.]), torch.tensor([3., 3.]))    # rows 0..3 (twice)
>>> j = Interval(torch.tensor([0., 8.]), torch.tensor([3., 11.]))   # cols 0..3, then 8..11
>>> t = evaluate(near, i, j, INTERVAL_OPS)
>>> t.can_true.tolist(), t.can_false.tolist()
([True, False], [False, True])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EXACT = 2.0 ** 52  # beyond this a float64 may not hold the integer: widen to infinity


@dataclass
class Interval:
    """Every integer value in [lo, hi] (float64 tensors, broadcastable)."""
    lo: torch.Tensor
    hi: torch.Tensor


@dataclass
class Truth:
    """A predicate over a tile: can it hold for some pair, can it fail for some pair (bool tensors)."""
    can_true: torch.Tensor
    can_false: torch.Tensor


def _widen(lo, hi) -> Interval:
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    lo = torch.where(lo < -_EXACT, -inf, lo)
    hi = torch.where(hi > _EXACT, inf, hi)
    return Interval(lo, hi)


def _iv(x) -> Interval:
    if isinstance(x, Interval):
        return x
    if isinstance(x, Truth):  # a bool used as a number: 0 or 1
        return Interval((~x.can_false).double(), x.can_true.double())
    t = torch.tensor(float(x), dtype=torch.float64)
    return Interval(t, t)


def _truth(x) -> Truth:
    if isinstance(x, Truth):
        return x
    if isinstance(x, bool):
        return Truth(torch.tensor(x), torch.tensor(not x))
    v = _iv(x)  # a number used as a condition: true where nonzero
    return Truth(~((v.lo == 0) & (v.hi == 0)), (v.lo <= 0) & (v.hi >= 0))


def _mul(a: Interval, b: Interval) -> Interval:
    corners = [torch.nan_to_num(x * y, nan=0.0) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]  # 0 * inf = 0
    stacked = torch.stack(torch.broadcast_tensors(*corners))
    return _widen(stacked.amin(0), stacked.amax(0))


def _floordiv(a: Interval, b: Interval) -> Interval:
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    pos, neg = b.lo > 0, b.hi < 0
    corners = [torch.floor(x / y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    corners = [torch.nan_to_num(c, nan=0.0) for c in corners]   # inf / inf: the sign is all we keep
    stacked = torch.stack(torch.broadcast_tensors(*corners))
    lo, hi = stacked.amin(0), stacked.amax(0)
    safe = pos | neg  # a divisor that may be 0 (x // 0 = 0) or change sign: give up on a bound
    lo = torch.where(safe, lo, -inf)
    hi = torch.where(safe, hi, inf)
    return _widen(lo, hi)


def _mod(a: Interval, b: Interval) -> Interval:
    """Python's % (sign of the divisor); x % 0 = 0."""
    const = b.lo == b.hi
    c = b.lo
    k_lo, k_hi = torch.floor(a.lo / c), torch.floor(a.hi / c)
    one_period = const & (c != 0) & torch.isfinite(a.lo) & torch.isfinite(a.hi) & (k_lo == k_hi)
    lo_in = a.lo - c * k_lo
    hi_in = a.hi - c * k_lo
    # otherwise anywhere between 0 and the divisor (exclusive), 0 included for a possible 0 divisor
    lo_any = torch.minimum(b.lo + 1, torch.zeros_like(b.lo)).clamp(max=0)
    hi_any = torch.maximum(b.hi - 1, torch.zeros_like(b.hi)).clamp(min=0)
    lo = torch.where(one_period, torch.minimum(lo_in, hi_in), lo_any)
    hi = torch.where(one_period, torch.maximum(lo_in, hi_in), hi_any)
    return _widen(*torch.broadcast_tensors(lo, hi))


class IntervalOps:
    """The `ops` of `predicate.evaluate` over intervals (arithmetic) and truths (comparisons, logic)."""

    def const(self, v):
        return _truth(v) if isinstance(v, bool) else _iv(v)

    def bin(self, op, a, b):
        a, b = _iv(a), _iv(b)
        if op == "+":
            return _widen(a.lo + b.lo, a.hi + b.hi)
        if op == "-":
            return _widen(a.lo - b.hi, a.hi - b.lo)
        if op == "*":
            return _mul(a, b)
        return _floordiv(a, b) if op == "//" else _mod(a, b)

    def call(self, func, args):
        if func == "abs":
            a = _iv(args[0])
            lo = torch.where(a.lo >= 0, a.lo, torch.where(a.hi <= 0, -a.hi, torch.zeros_like(a.lo)))
            hi = torch.maximum(a.hi.abs(), a.lo.abs())
            return Interval(*torch.broadcast_tensors(lo, hi))
        a, b = _iv(args[0]), _iv(args[1])
        fn = torch.minimum if func == "min" else torch.maximum
        return Interval(fn(a.lo, b.lo), fn(a.hi, b.hi))

    def cmp(self, op, a, b):
        a, b = _iv(a), _iv(b)
        if op in (">", ">="):
            a, b, op = b, a, "<" if op == ">" else "<="
        if op == "<":
            return Truth(a.lo < b.hi, a.hi >= b.lo)
        if op == "<=":
            return Truth(a.lo <= b.hi, a.hi > b.lo)
        overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
        single = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
        return Truth(overlap, ~single) if op == "==" else Truth(~single, overlap)

    def logic(self, op, a, b=None):
        a = _truth(a)
        if op == "not":
            return Truth(a.can_false, a.can_true)
        b = _truth(b)
        if op == "and":
            return Truth(a.can_true & b.can_true, a.can_false | b.can_false)
        return Truth(a.can_true | b.can_true, a.can_false & b.can_false)


INTERVAL_OPS = IntervalOps()


def tile_truth(pred, r0, r1, c0, c1) -> Truth:
    """The truth of `pred` over tiles with rows [r0, r1] and columns [c0, c1] (broadcastable int tensors)."""
    from .predicate import evaluate
    i = Interval(r0.double(), r1.double())
    j = Interval(c0.double(), c1.double())
    return _truth(evaluate(pred, i, j, INTERVAL_OPS))
