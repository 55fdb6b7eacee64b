"""ALiBi's head slopes (Press et al. 2022): `alibi_slope(h, heads)`, a float per head, one geometric sequence.

For `n = heads` a power of two, head h (from 0) has slope `2^(-8 (h + 1) / n)`. Otherwise, as in the paper's
code and transformers' `build_alibi_tensor`: with `p` the largest power of two below n, the first p heads
take the slopes of p heads, and the remaining `n - p` take every other slope of `2p` heads
(`2^(-4 (2 t + 1) / p)`, t = 0, 1, ...). The bias of ALiBi is `-alibi_slope(h, heads) * abs(i - j)`.

>>> [round(s, 4) for s in slopes(4)]
[0.25, 0.0625, 0.0156, 0.0039]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .expr import Term


def slopes(n: int) -> tuple[float, ...]:
    """The slopes of heads 0 .. n-1."""
    p = 1 << int(math.floor(math.log2(n)))
    base = [2.0 ** (-8.0 * (h + 1) / p) for h in range(p)]
    extra = [2.0 ** (-4.0 * (2 * t + 1) / p) for t in range(n - p)]
    return tuple(base + extra)


@dataclass(frozen=True)
class AlibiSlope(Term):
    """`alibi_slope(h, heads)`: the slope of head h among `heads` heads (0 for a head past the last)."""
    heads: int
    reads = ("h",)

    def at(self, ops):
        return ops.per_head(slopes(self.heads))

    def source(self) -> str:
        return f"alibi_slope(h, {self.heads})"

    def flops(self) -> int:
        return 1   # one read of a per-head constant
