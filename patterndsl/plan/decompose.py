"""Masks as disjoint bands plus global rows and columns: the structure the band lowerings exploit.

A mask decomposes when it is a union of bands, `Rows(S)` and `Cols(S)`, possibly intersected with one band
(`causal`, say), which distributes over the union's bands. The bands are made disjoint (a pair allowed by
two bands is counted once): finer steps are kept whole and coarser bands lose the offsets a finer one
covers, which is a union of at most two bands when the finer step divides the coarser one; otherwise the
mask does not decompose. Rows and columns are evaluated exactly against the whole mask by whoever runs them
(a global row sees every key the mask allows; a global column is seen by each row whose bands miss it).

Every band is then one of three shapes in its own coordinates: a finite window (`lo <= i - j <= hi`), a
shifted causal half-plane (`j <= i - lo`), or everything. A band with `step = s > 1` lives on the residue
classes of `i mod s` (queries `r + s a` meet keys `r + s b` at offsets `s (a - b)`): permuting tokens by
residue makes it a band of step 1 with bounds divided by `s`.

>>> from patterndsl.ir import mask as M
>>> d = decompose(M.sliding(2) | M.global_({0}))
>>> d.bands, sorted(d.rows), sorted(d.cols)
((Band(lo=-2, hi=2, step=1),), [0], [0])
>>> decompose(M.inter(M.CAUSAL, M.window(128, 0) | M.strided(128))).bands
(Band(lo=0, hi=128, step=1), Band(lo=256, hi=None, step=128))
>>> in_classes(M.Band(-256, 256, 2))
Band(lo=-128, hi=128, step=1)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..ir import mask as M

MAX_GLOBAL = 1024    # more global rows or columns than this: a dense piece of that size is not worth it


@dataclass(frozen=True)
class Decomposition:
    mask: M.Mask            # the whole mask (rows and columns are evaluated against it)
    bands: tuple            # disjoint `M.Band`s
    rows: frozenset         # global rows: each sees every key the mask allows
    cols: frozenset         # global columns: seen by every row whose bands miss them

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({b.step for b in self.bands}))


@functools.lru_cache(maxsize=256)
def decompose(mask: M.Mask) -> Decomposition | None:
    """The bands, global rows and global columns of `mask`, or None if it is not of that form."""
    parts = _parts(mask)
    if parts is None:
        return None
    bands, rows, cols = [], set(), set()
    for p in parts:
        if isinstance(p, M.Band):
            bands.append(p)
        elif isinstance(p, M.Rows):
            rows |= p.idx
        elif isinstance(p, M.Cols):
            cols |= p.idx
        elif not isinstance(p, M.Empty):
            return None
    bands = _disjoint(bands)
    if bands is None or not bands or len(rows) > MAX_GLOBAL or len(cols) > MAX_GLOBAL:
        return None
    if any(b.lo is None and b.hi is not None for b in bands):   # j >= i - hi only: not a shape we run
        return None
    return Decomposition(mask, tuple(bands), frozenset(rows), frozenset(cols))


def _parts(mask: M.Mask):
    """Union parts, with one intersecting band distributed over the union's bands."""
    if isinstance(mask, M.Inter):
        bands = [p for p in mask.parts if isinstance(p, M.Band)]
        rest = [p for p in mask.parts if not isinstance(p, M.Band)]
        if len(bands) != 1 or len(rest) != 1 or not isinstance(rest[0], M.Union):
            return None
        return [M.inter(bands[0], p) if isinstance(p, M.Band) else p for p in rest[0].parts]
    return list(mask.parts) if isinstance(mask, M.Union) else [mask]


def _disjoint(bands: list) -> list | None:
    """The same pairs as disjoint bands (finest step first), or None when holes would not be bands."""
    out: list = []
    for b in sorted(bands, key=lambda x: (x.step, x.sort_key())):
        pieces = [b]
        for a in out:
            cut = []
            for p in pieces:
                rest = _minus(p, a)
                if rest is None:
                    return None
                cut += rest
            pieces = cut
        out += pieces
    return out


def _minus(p: M.Band, a: M.Band) -> list | None:
    """Band p without the offsets of band a (a list of bands), or None if that is not a union of bands."""
    inf = float("inf")
    lo, hi = max(_lo(p), _lo(a)), min(_hi(p), _hi(a))
    step = p.step * a.step // math.gcd(p.step, a.step)
    bounded = -inf < lo and hi < inf
    if lo > hi or (bounded and math.floor(hi / step) * step < lo):     # no common offset
        return [p]
    if p.step % a.step:
        return None
    left = M.band(p.lo, None if a.lo is None else a.lo - 1, p.step) if _lo(a) > -inf else M.EMPTY
    right = M.band(None if a.hi is None else a.hi + 1, p.hi, p.step) if _hi(a) < inf else M.EMPTY
    left = M.inter(left, p) if isinstance(left, M.Band) else left
    right = M.inter(right, p) if isinstance(right, M.Band) else right
    return [x for x in (left, right) if isinstance(x, M.Band)]


def _lo(b: M.Band) -> float:
    return -float("inf") if b.lo is None else b.lo


def _hi(b: M.Band) -> float:
    return float("inf") if b.hi is None else b.hi


def in_classes(band: M.Band, shift: int = 0) -> M.Band | M.Full:
    """The band in the coordinates of its residue classes (`a - b = (i - j) / step`), of step 1; `shift`
    moves the query classes (a query offset of `shift * step` positions: `a + shift - b` in the band)."""
    s = band.step
    lo = None if band.lo is None else -((-band.lo) // s) - shift
    hi = None if band.hi is None else band.hi // s - shift
    return M.band(lo, hi, 1)


def effective(band, n_q: int, n_k: int):
    """A step-1 band with the bounds that cannot bind at `n_q x n_k` dropped: `hi >= n_q - 1` makes a window
    the causal half-plane `j <= i - lo` (cheaper: whole key blocks beyond the diagonal are skipped)."""
    if not isinstance(band, M.Band):
        return band
    hi = None if band.hi is not None and band.hi >= n_q - 1 else band.hi
    lo = None if band.lo is not None and band.lo <= -(n_k - 1) and hi is None else band.lo
    return M.band(lo, hi, 1)


def shape_of(band: M.Band) -> str:
    """'window' (finite), 'causal' (`j <= i - lo`) or 'full' (every pair of a residue class)."""
    b = in_classes(band)
    if isinstance(b, M.Full):
        return "full"
    return "window" if b.hi is not None else "causal"
