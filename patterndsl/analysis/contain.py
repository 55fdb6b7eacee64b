"""Mask inclusion `a <= b` (every pair of a is a pair of b): proved for every N, or checked up to a bound.

For masks in the decidable fragment (`profile.py`) the answer holds for every N: both masks are evaluated on
the profile's witness pairs (`cases.py`), which stand for every pair of every size (a mask that reads no `N`
allows the same (i, j) at every N > max(i, j)). Free leaves are enumerated: `same(x)` is true on the diagonal
and free elsewhere, so "ids all equal" and "ids all distinct" cover every pair's two cases exactly;
`random(...)` draws change with N, so it is taken as "every block" and "no block" (sound for a proof), and a
pair found that way is re-checked against the real draws. Outside the fragment, or over the witness budget,
the masks are compared on tile layouts at every size up to the bound that matters (`bounded.py`).

A pair found is minimised: the one with the smallest N, then the first in row-major order.

>>> from patterndsl.ir import mask as M
>>> print(inclusion(M.window(3, 0), M.CAUSAL))
holds, proved for every N
>>> print(inclusion(M.CAUSAL, M.window(3, 0)))
fails: i=4, j=0 (N = 5)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import PatternError
from ..ir import mask as M
from ..plan.points import mask_at
from .bounded import first_missing
from .cases import BUDGET, TooMany, witnesses
from .primitives import profile, substitute

DEFAULT_BOUND = 1024
MAX_BOUND = 1 << 16    # bounded checks visit tile layouts up to this N
MAX_ATOMS = 4          # free leaves enumerated (2^k assignments)
MINIMISE_UP_TO = 8192  # a witness pair with N above this is reported as found, not minimised
SMALL_SIZES = 64       # masks that read N (random) are checked at every N up to this, then at powers of two


@dataclass(frozen=True)
class Pair:
    """A pair (i, j) of size N; `assume` names the runtime ids it needs (`same`), if any."""
    i: int
    j: int
    n: int
    assume: str = ""

    def __str__(self) -> str:
        return f"i={self.i}, j={self.j} (N = {self.n}{', ' + self.assume if self.assume else ''})"


@dataclass(frozen=True)
class Inclusion:
    """Whether a <= b; `missing` is a pair of a not in b when it fails; `proved` is True for every N, else
    `checked` says which sizes were checked and `reason` why no proof."""
    holds: bool
    missing: Pair | None
    proved: bool
    checked: str
    reason: str | None = None

    def __str__(self) -> str:
        if not self.holds:
            return f"fails: {self.missing}"
        return "holds, " + ("proved for every N" if self.proved else f"checked for {self.checked}")


def _assignments(atoms):
    atoms = sorted(atoms, key=repr)
    for values in itertools.product((True, False), repeat=len(atoms)):
        yield dict(zip(atoms, values))


def _assumption(values: dict) -> str:
    names = [f"ids of same({a.name}) all {'equal' if v else 'distinct'}" for a, v in values.items()
             if isinstance(a, M.Same)]
    return ", ".join(names)


def _first_hit(a: M.Mask, b: M.Mask, i: torch.Tensor, j: torch.Tensor):
    """The witness pair in a and not b with the smallest (max(i, j), i, j), or None."""
    best = None
    for s in range(0, i.numel(), 1 << 20):
        ci, cj = i[s:s + (1 << 20)], j[s:s + (1 << 20)]
        n = int(torch.maximum(ci, cj).max()) + 1
        bad = mask_at(a, ci, cj, (n, n)) & ~mask_at(b, ci, cj, (n, n))
        if bad.any():
            bi, bj = ci[bad], cj[bad]
            k = int(torch.argmin(torch.maximum(bi, bj) * (1 << 31) + bi))   # bi < 2^31 on any real size
            cand = (max(int(bi[k]), int(bj[k])), int(bi[k]), int(bj[k]))
            best = cand if best is None or cand < best else best
    return None if best is None else (best[1], best[2])


def _minimised(a: M.Mask, b: M.Mask, i: int, j: int, assume: str) -> Pair:
    n = max(i, j) + 1
    if n <= MINIMISE_UP_TO:
        i, j = first_missing(a, b, n)
        n = max(i, j) + 1
    return Pair(i, j, n, assume)


def _proof(a: M.Mask, b: M.Mask):
    """An Inclusion proved for every N, or (None, reason) when the fragment or the budget says no."""
    prof = profile(a).merge(profile(b))
    if prof.reason:
        return None, prof.reason
    if len(prof.atoms) > MAX_ATOMS:
        return None, f"more than {MAX_ATOMS} same/random leaves"
    try:
        i, j = witnesses(prof)
    except TooMany as e:
        return None, f"the closed forms need {e} (budget {BUDGET})"
    for values in _assignments(prof.atoms):
        sa, sb = substitute(a, values), substitute(b, values)
        hit = _first_hit(sa, sb, i, j)
        if hit is None:
            continue
        if any(isinstance(x, M.Random) for x in values):
            return None, "random(...) draws change with N: no proof for every N"
        return Inclusion(False, _minimised(sa, sb, *hit, _assumption(values)), True, "every N"), None
    return Inclusion(True, None, True, "every N"), None


def sizes_to_check(masks, bound: int) -> tuple[list[int], str]:
    """The sizes a bounded check visits, and how to say so: N = bound covers every smaller N unless a mask
    reads N (random draws), which is then checked at every N up to 64 and at powers of two."""
    if not any(isinstance(x, M.Random) for m in masks for x in M.walk(m)):
        return [bound], f"N <= {bound}"
    small = list(range(1, min(bound, SMALL_SIZES) + 1))
    powers = [1 << k for k in range(7, bound.bit_length()) if (1 << k) < bound]
    sizes = sorted(set(small + powers + [bound]))
    shown = f"N = 1..{min(bound, SMALL_SIZES)}" + (", " + ", ".join(map(str, powers)) if powers else "")
    shown += f", {bound}" if bound > SMALL_SIZES else ""
    return sizes, shown


def bounded_inclusion(a: M.Mask, b: M.Mask, bound: int, reason: str | None = None) -> Inclusion:
    """a <= b checked on tile layouts at the sizes `sizes_to_check` gives (same(...) leaves enumerated)."""
    same = {x for m in (a, b) for x in M.walk(m) if isinstance(x, M.Same)}
    sizes, shown = sizes_to_check((a, b), bound)
    for values in _assignments(same):
        sa, sb = substitute(a, values), substitute(b, values)
        for n in sizes:
            hit = first_missing(sa, sb, n)
            if hit is not None:
                reads_n = any(isinstance(x, M.Random) for m in (sa, sb) for x in M.walk(m))
                pair = Pair(*hit, n if reads_n else max(hit) + 1, _assumption(values))
                return Inclusion(False, pair, True, shown, reason)
    return Inclusion(True, None, False, shown, reason)


def check_bound(bound) -> int:
    """The bound of bounded checks: an int in 1..MAX_BOUND, else a PatternError."""
    if not isinstance(bound, int) or isinstance(bound, bool) or not 1 <= bound <= MAX_BOUND:
        raise PatternError(f"the bound N of bounded checks must be an int in 1..{MAX_BOUND}, got {bound!r}",
                           hint="most comparisons are proved for every N; the bound only serves the rest")
    return bound


def inclusion(a: M.Mask, b: M.Mask, bound: int = DEFAULT_BOUND) -> Inclusion:
    """Whether every pair of `a` is a pair of `b`: proved for every N when the closed forms decide it, else
    checked up to N = `bound`. A failure carries the first missing pair, which is a proof of failure."""
    if a == b or isinstance(a, M.Empty) or isinstance(b, M.Full):
        return Inclusion(True, None, True, "every N")
    result, reason = _proof(a, b)
    if result is None and _through_a_part(a, b):
        return Inclusion(True, None, True, "every N")
    return result if result is not None else bounded_inclusion(a, b, bound, reason)


def _through_a_part(a: M.Mask, b: M.Mask) -> bool:
    """a <= b proved through one factor of a (a & c <= b when a <= b) or one part of b (a <= b | c when
    a <= b): masks whose other parts are outside the fragment still get a proof when these parts decide."""
    factors = a.parts if isinstance(a, M.Inter) else (a,)
    parts = b.parts if isinstance(b, M.Union) else (b,)
    for x, y in [(f, b) for f in factors if len(factors) > 1] + [(a, p) for p in parts if len(parts) > 1]:
        if x == y:
            return True
        got, _ = _proof(x, y)
        if got is not None and got.holds:
            return True
    return False
