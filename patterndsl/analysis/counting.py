"""Allowed pairs and tiles as exact expressions in N (sympy), from a mask's profile.

Past the special rows, columns and zones, growing N by one adds a row and a column whose allowed pairs are
linear in N with coefficients periodic in N (the profile's cycle c); so the number of allowed pairs is a
quasi-polynomial of degree <= 2 with period c from some N on, and so is the number of tiles (in T = N / B,
period c / gcd(c, B)). The counts are computed exactly at 3 sizes per residue class, the quadratics
interpolated, checked at a fourth size, and extended down to the smallest N where they still hold.

>>> from patterndsl.ir import mask as M
>>> print(pair_count(M.sliding(2)))
5*N - 6 for N >= 2
>>> print(pair_count(M.CAUSAL))
N**2/2 + N/2 for N >= 1
>>> print(pair_count(M.strided(2)))
N**2/2 + 1/2 if N is odd, N**2/2 if N is even, for N >= 1
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import sympy
import torch

from ..ir import mask as M
from ..plan.layout import FULL, tile_layout
from ..plan.points import mask_at
from .primitives import profile
from .profile import merged

N = sympy.Symbol("N", positive=True, integer=True)
T = sympy.Symbol("T", positive=True, integer=True)
MAX_DENSE = 1 << 13         # pairs are counted on sizes up to this; beyond, no exact expression


@dataclass(frozen=True)
class QuasiPoly:
    """`polys[N % period]` for N >= start (a single polynomial when period is 1)."""
    var: sympy.Symbol
    period: int
    start: int
    polys: tuple

    def at(self, n: int) -> int:
        return int(self.polys[n % self.period].subs(self.var, n))

    @property
    def expr(self) -> sympy.Expr:
        """One sympy expression (a Piecewise over `var mod period` when the period is > 1)."""
        if self.period == 1:
            return self.polys[0]
        return sympy.Piecewise(*[(p, sympy.Eq(sympy.Mod(self.var, self.period), r))
                                 for r, p in enumerate(self.polys[:-1])], (self.polys[-1], True))

    def body(self) -> str:
        """The expression without its range of validity."""
        v = self.var
        if self.period == 1:
            return str(self.polys[0])
        if self.period == 2:
            return f"{self.polys[1]} if {v} is odd, {self.polys[0]} if {v} is even"
        if self.period <= 4:
            return "; ".join(f"{p} if {v} % {self.period} == {r}" for r, p in enumerate(self.polys))
        return self._summary()

    def short(self) -> str:
        return f"{self.body()} ({self.var} >= {self.start})"

    def __str__(self) -> str:
        return f"{self.body()}{',' if self.period > 1 else ''} for {self.var} >= {self.start}"

    def _summary(self) -> str:
        """`common + c` with the range of the constant c over the residues (long periods)."""
        consts = [p.subs(self.var, 0) for p in self.polys]
        common = {sympy.expand(p - c) for p, c in zip(self.polys, consts)}
        if len(common) > 1:
            return f"a quadratic in {self.var} that depends on {self.var} % {self.period}"
        lo, hi = min(consts), max(consts)
        return f"{common.pop()} + c with {lo} <= c <= {hi} depending on {self.var} % {self.period}"


def _quadratic(points) -> tuple[Fraction, Fraction, Fraction]:
    """Coefficients (a, b, c) of a*x^2 + b*x + c through three points (Lagrange, exact)."""
    (x0, y0), (x1, y1), (x2, y2) = [(Fraction(x), Fraction(y)) for x, y in points]
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    a = (d12 - d01) / (x2 - x0)
    b = d01 - a * (x0 + x1)
    c = y0 - a * x0 * x0 - b * x0
    return a, b, c


def _fit(values: dict, var, period: int, first: int) -> QuasiPoly | None:
    """Quadratics per residue through 3 sizes from `first`, checked on the 4th, extended downwards."""
    coefs = []
    for r in range(period):
        xs = [first + ((r - first) % period) + t * period for t in range(4)]
        a, b, c = _quadratic([(x, values[x]) for x in xs[:3]])
        if a * xs[3] ** 2 + b * xs[3] + c != values[xs[3]]:
            return None
        coefs.append((a, b, c))
    value = lambda x: coefs[x % period][0] * x * x + coefs[x % period][1] * x + coefs[x % period][2]  # noqa: E731
    start = first
    while start - 1 in values and value(start - 1) == values[start - 1]:
        start -= 1
    if len(set(coefs)) == 1:
        period, coefs = 1, coefs[:1]
    polys = tuple(sympy.Rational(a) * var ** 2 + sympy.Rational(b) * var + sympy.Rational(c) for a, b, c in coefs)
    return QuasiPoly(var, period, start, polys)


def _span(m: M.Mask):
    prof = profile(m)
    zones = merged(prof.zones + ((0, 0),))
    reach = max(max(abs(lo), abs(hi)) for lo, hi in zones)
    top = max([hi for _, hi in merged(prof.rows + prof.cols)] + [0])
    return prof, top + reach + prof.cycle + 2


def _pairs_upto(m: M.Mask, n_end: int) -> dict:
    """Allowed pairs of the n x n mask for every n <= n_end (a histogram of max(i, j))."""
    hist = torch.zeros(n_end + 1, dtype=torch.long)
    step = max(1, (1 << 20) // n_end)
    for a in range(0, n_end, step):
        i = torch.arange(a, min(n_end, a + step))[:, None]
        j = torch.arange(n_end)[None, :]
        ok = mask_at(m, i, j, (n_end, n_end))
        top = torch.maximum(i, j)[ok.expand(i.shape[0], n_end)]
        hist += torch.bincount(top + 1, minlength=n_end + 1)
    counts = torch.cumsum(hist, 0)
    return {n: int(counts[n]) for n in range(1, n_end + 1)}


def pair_count(m: M.Mask) -> QuasiPoly | None:
    """Allowed pairs of the N x N mask as an exact expression in N (None outside the fragment or too large)."""
    prof, first = _span(m)
    if prof.reason or prof.atoms or first + 4 * prof.cycle > MAX_DENSE:
        return None
    return _fit(_pairs_upto(m, first + 4 * prof.cycle), N, prof.cycle, first)


@dataclass(frozen=True)
class TileCounts:
    """Nonempty and full tiles of B x B at N = T * B, as quasi-polynomials in T."""
    block: int
    nonempty: QuasiPoly
    full: QuasiPoly


def tile_counts(m: M.Mask, block: int = 64) -> TileCounts | None:
    """Tiles of `block` x `block` the planner sees at N = T * block, as expressions in T (None when the
    counts do not settle into the expected form, e.g. outside the fragment)."""
    prof, first = _span(m)
    if prof.reason or prof.atoms:
        return None
    c = prof.cycle // math.gcd(prof.cycle, block)
    t_first = -(-first // block) + 1
    t_end = t_first + 4 * c
    if t_end * block > 1 << 22:
        return None
    nonempty, full = {}, {}
    for t in range(max(1, t_first - 8), t_end + 1):
        lay = tile_layout(m, t * block, t * block, block, block)
        nonempty[t], full[t] = lay.nnz, int((lay.cls == FULL).sum())
    a, b = _fit(nonempty, T, c, t_first), _fit(full, T, c, t_first)
    return None if a is None or b is None else TileCounts(block, a, b)
