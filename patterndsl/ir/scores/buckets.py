"""T5's relative-position buckets and the learned bias table they index: `t5_bias(table, buckets, max_distance,
bidirectional)` is `table[h, bucket(j - i)]`.

The bucket of a relative position `r = j - i` is T5's (`T5Attention._relative_position_bucket` in
transformers; Raffel et al. 2020): with `n = buckets` (halved when bidirectional, the upper half for keys
after the query, r > 0), distance `d = |r|` (bidirectional) or `max(-r, 0)` (causal: later keys share bucket
0), `e = n // 2`: `d` itself when `d < e`, else `min(n - 1, e + int(log(d / e) / log(max_distance / e) *
(n - e)))`, the logarithm taken in float32 as T5 does. The bucket is a nondecreasing step function of `d`
that is constant from `max_distance` on, so it is computed here once, exactly as T5 computes it, as its
thresholds: `bucket(d) = #{k : d >= t_k}`; every target evaluates the same comparisons (no logarithm at run
time, so the kernels agree with T5 bit for bit).

>>> T5Bias("rel", 8, 20, True).thresholds
(1, 2, 7)
>>> [T5Bias("rel", 32, 128, False).bucket_of(d) for d in (0, 15, 16, 50, 127, 128, 999)]
[0, 15, 16, 24, 31, 31, 31]
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from .expr import Term

MAX_DISTANCE = 1 << 20   # thresholds are computed over distances 0 .. max_distance
MAX_BUCKETS = 1 << 12


@functools.lru_cache(maxsize=64)
def _thresholds(n: int, max_distance: int) -> tuple[int, ...]:
    """t_k (k = 1 .. n-1): the first distance whose bucket is >= k, for one side of `n` buckets."""
    import torch
    e = n // 2
    d = torch.arange(max_distance + 1)
    large = e + (torch.log(d.float() / e) / math.log(max_distance / e) * (n - e)).to(torch.long)
    b = torch.where(d < e, d, torch.clamp(large, max=n - 1))
    b = torch.cummax(b, 0).values     # nondecreasing already; cummax guards the float32 logarithm
    return tuple(int(torch.searchsorted(b, k)) for k in range(1, n) if bool((b >= k).any()))


@dataclass(frozen=True)
class T5Bias(Term):
    """`table[h, bucket(j - i)]` for the learned `param table[heads, buckets]`."""
    table: str
    buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    thresholds: tuple[int, ...] = field(init=False, compare=False, repr=False)   # computed once, eagerly
    reads = ("i", "j", "h")

    def __post_init__(self):
        object.__setattr__(self, "thresholds", _thresholds(self.side, self.max_distance) if self.side >= 2 else ())

    @property
    def side(self) -> int:
        """Buckets per side: all of them (causal), or half (bidirectional: the upper half for j > i)."""
        return self.buckets // 2 if self.bidirectional else self.buckets

    def bucket_of(self, d: int, after: bool = False) -> int:
        """The bucket of distance `d` (a Python int; `after`: the key is after the query, bidirectional)."""
        return (self.side if after and self.bidirectional else 0) + sum(d >= t for t in self.thresholds)

    def bucket(self, ops):
        """The bucket of pair (i, j) as an integer, from comparisons only."""
        rel = ops.bin("-", ops.var("j"), ops.var("i"))
        if self.bidirectional:
            dist = ops.call("abs", [rel])
            out = ops.scaled_flag(ops.cmp(">", rel, 0), self.side)
        else:
            dist = ops.call("max", [ops.bin("-", 0, rel), 0])
            out = 0
        for t in self.thresholds:
            out = ops.bin("+", out, ops.scaled_flag(ops.cmp(">=", dist, t), 1))
        return out

    def at(self, ops):
        return ops.table(self.table, self.buckets, self.bucket(ops))

    def source(self) -> str:
        return (f"t5_bias({self.table}, {self.buckets}, {self.max_distance}, "
                f"{str(self.bidirectional).lower()})")

    def tables(self) -> tuple[str, ...]:
        return (self.table,)

    def flops(self) -> int:
        return 4 + 2 * len(self.thresholds)   # distance, side, one compare-and-add per threshold, the read
