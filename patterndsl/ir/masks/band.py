"""Bands: `lo <= i - j <= hi` and `(i - j) % step == 0`, the one node behind causal, sliding, window and strided.

`sliding(w, d)` is `band(-w*d, w*d, d)`, `window(before, after, d)` is `band(-after*d, before*d, d)`,
`strided(s)` is `band(None, None, s)` and `causal` is `band(0, None)` (None: unbounded). Bands classify tiles
by interval arithmetic on `i - j` over the tile (residues for dilated and strided bands) and enumerate the
key tiles of each query tile as one arithmetic range, so their layouts cost O(nonempty tiles).

>>> sliding(2) == Band(-2, 2, 1)
True
>>> (sliding(1) | sliding(2)).source(), (CAUSAL & sliding(256)).source()
('sliding(2)', 'window(256, 0)')
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from .base import KEEP_ALL, Builder, Keep, Mask, classes, ranges_to_pairs, sure
from .logic import EMPTY, FULL


@dataclass(frozen=True, repr=True)
class Band(Mask):
    """`lo <= i - j <= hi` (None: unbounded) and `(i - j) % step == 0`."""
    lo: int | None
    hi: int | None
    step: int = 1

    def problems(self):
        if self.step < 1:
            yield f"band step {self.step} < 1"
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            yield f"empty band {self} not folded"
        if self == Band(None, None, 1):
            yield "full band not folded"

    def source(self) -> str:
        lo, hi, d = self.lo, self.hi, self.step
        if self == CAUSAL:
            return "causal"
        if lo is not None and hi is not None and lo <= 0 <= hi:
            before, after = hi // d, -lo // d
            dil = f", {d}" if d > 1 else ""
            return f"sliding({before}{dil})" if before == after else f"window({before}, {after}{dil})"
        if lo is None and hi is None:
            return f"strided({d})"
        conds = ([f"i - j >= {lo}"] if lo is not None else []) + ([f"i - j <= {hi}"] if hi is not None else [])
        if d > 1:
            conds.append(f"(i - j) % {d} == 0")
        return f"where({' and '.join(conds)})"

    def at(self, i, j, ops):
        d = ops.bin("-", i, j)
        out = ops.const(True)
        if self.lo is not None:
            out = ops.logic("and", out, ops.cmp(">=", d, ops.const(self.lo)))
        if self.hi is not None:
            out = ops.logic("and", out, ops.cmp("<=", d, ops.const(self.hi)))
        if self.step > 1:
            out = ops.logic("and", out, ops.cmp("==", ops.bin("%", d, ops.const(self.step)), ops.const(0)))
        return out

    def classify(self, tiles, a, b):
        g = tiles.grid
        (r0, r1), (c0, c1) = g.row_bounds(a), g.col_bounds(b)
        dmin, dmax = r0 - c1, r1 - c0                        # the range of i - j over the tile
        lo = dmin if self.lo is None else dmin.clamp(min=self.lo)
        hi = dmax if self.hi is None else dmax.clamp(max=self.hi)
        inside = torch.ones((), dtype=torch.bool)
        if self.lo is not None:
            inside = inside & (dmin >= self.lo)
        if self.hi is not None:
            inside = inside & (dmax <= self.hi)
        if self.step == 1:
            return sure(classes(inside, lo > hi))
        first = -torch.div(-lo, self.step, rounding_mode="floor") * self.step   # first multiple of step >= lo
        single = (dmin == dmax) & (torch.remainder(dmin, self.step) == 0)
        return sure(classes(inside & single, first > hi))

    def candidates(self, tiles):
        first, last = band_bounds(self, tiles.grid)
        return ranges_to_pairs(torch.arange(tiles.grid.nqb), first, last + 1)

    def retained(self, t: int) -> Keep:
        """Queries i >= t see keys j >= i - hi >= t - hi: a window keeps its last `hi` positions."""
        return KEEP_ALL if self.hi is None else Keep(max(0, t - self.hi))

    def pairs(self, n):
        """A bounded band: N per offset (the edge triangles, of order w^2, dropped: an upper bound exact to
        first order). Unbounded: exact once N passes the bound, for every N when the step is 1 (`causal` is
        N(N+1)/2) and for multiples of the step otherwise (between them below the count by < step/4)."""
        s = self.step
        if self.lo is not None and self.hi is not None:
            return n * ((self.hi - self.lo) // s + 1)
        if self.lo is None and self.hi is None:
            return n ** 2 * sympy.Rational(1, s)
        first = self.lo if self.lo is not None else -self.hi     # a bound on one side: its mirror has the count
        m = -first // s           # offsets below 0 that it adds (m > 0), or the offsets >= 0 it drops (m < 0)
        edge = s * m * (m + 1) // 2 if m > 0 else -s * m * (m + 1) // 2
        return n ** 2 * sympy.Rational(1, 2 * s) + n * sympy.Rational(1, 2) + m * n - edge

    @classmethod
    def union_all(cls, nodes: list) -> list:
        """Bands merged while any two are one band (`sliding(1) | sliding(2)` is `sliding(2)`)."""
        out = list(dict.fromkeys(nodes))
        merged = True
        while merged and len(out) > 1:
            merged = False
            for x, y in ((x, y) for x in range(len(out)) for y in range(len(out)) if x != y):
                one = out[x] if _covers(out[x], out[y]) else _joined(out[x], out[y])
                if one is not None and not isinstance(one, Band):
                    return [one]                                   # they cover every offset: full
                if one is not None:
                    out = [m for k, m in enumerate(out) if k not in (x, y)] + [one]
                    merged = True
                    break
        return out

    @classmethod
    def inter_all(cls, nodes: list) -> list:
        lo = max((b.lo for b in nodes if b.lo is not None), default=None)
        hi = min((b.hi for b in nodes if b.hi is not None), default=None)
        step = 1
        for b in nodes:
            step = step * b.step // math.gcd(step, b.step)
        return [band(lo, hi, step)]


CAUSAL = Band(0, None, 1)


def _covers(a: Band, b: Band) -> bool:
    """Every pair of band b is in band a (b's offsets are multiples of b.step, hence of a.step)."""
    return (b.step % a.step == 0 and (a.lo is None or (b.lo is not None and b.lo >= a.lo))
            and (a.hi is None or (b.hi is not None and b.hi <= a.hi)))


def _joined(a: Band, b: Band) -> Mask | None:
    """a | b as one band when it is one (same step, overlapping or touching on the lattice), else None."""
    if a.step != b.step:
        return None
    inf = float("inf")
    lo_a, lo_b = (-inf if a.lo is None else a.lo), (-inf if b.lo is None else b.lo)
    hi_a, hi_b = (inf if a.hi is None else a.hi), (inf if b.hi is None else b.hi)
    if max(lo_a, lo_b) > min(hi_a, hi_b) + a.step:
        return None
    lo = None if a.lo is None or b.lo is None else min(a.lo, b.lo)
    hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
    return band(lo, hi, a.step)


# ------------------------------------------------------------------------------------------- constructors
def band(lo: int | None, hi: int | None, step: int = 1) -> Mask:
    """A canonical band: bounds snapped to multiples of step; empty and full bands folded."""
    if step < 1:
        raise ValueError("band step must be >= 1")
    if lo is not None:
        lo = -((-lo) // step) * step  # ceil to a multiple of step
    if hi is not None:
        hi = (hi // step) * step
    if lo is not None and hi is not None and lo > hi:
        return EMPTY
    if lo is None and hi is None and step == 1:
        return FULL
    return Band(lo, hi, step)


def sliding(width: int, dilation: int = 1) -> Mask:
    return band(-width * dilation, width * dilation, dilation)


def window(before: int, after: int, dilation: int = 1) -> Mask:
    return band(-after * dilation, before * dilation, dilation)


def strided(stride: int) -> Mask:
    return band(None, None, stride)


BUILDERS = {
    "sliding": Builder(sliding, {"width": (0, "window width"), "dilation": (1, None)}),
    "window": Builder(window, {"before": (0, None), "after": (0, None), "dilation": (1, None)}),
    "strided": Builder(strided, {"stride": (1, None)}),
}


# --------------------------------------------------------------------------------------------- loop bounds
def band_bounds(b: Band, grid, by: str = "rows"):
    """Arithmetic loop bounds of a band on a grid: for each query tile (`by="rows"`) the first and last key
    tile that meet it, or for each key tile (`by="cols"`) the first and last query tile; `last < first`
    where none do."""
    g = grid
    if by == "rows":
        r0, r1 = g.row_bounds(torch.arange(g.nqb))
        lo_j = r0 - b.hi if b.hi is not None else torch.zeros_like(r0)
        hi_j = r1 - b.lo if b.lo is not None else torch.full_like(r1, g.n_k - 1)
        return _tile_span(lo_j, hi_j, g.n_k, g.bn)
    c0, c1 = g.col_bounds(torch.arange(g.nkb))
    lo_r = c0 + b.lo - g.q_offset if b.lo is not None else torch.zeros_like(c0)     # rows, not positions
    hi_r = c1 + b.hi - g.q_offset if b.hi is not None else torch.full_like(c1, g.n_q - 1)
    return _tile_span(lo_r, hi_r, g.n_q, g.bm)


def _tile_span(lo, hi, n, block):
    lo, hi = lo.clamp(min=0), hi.clamp(max=n - 1)
    none = lo > hi
    return torch.where(none, 0, lo // block), torch.where(none, -1, hi // block)

