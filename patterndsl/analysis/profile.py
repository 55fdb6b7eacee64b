"""Profiles: the finitely many cases that fix a mask's value at every (i, j), whatever N.

A mask in the decidable fragment (bands, index sets, blocks, residues, affine-periodic `where`s, and their
unions, intersections and complements) is, at a pair (i, j) where `i` is no special row and `j` no special
column, a function of `d = i - j` and `i mod mixed` that is periodic in `d` outside finitely many zones. A
`Profile` records exactly that: the zones of `d`, the special rows and columns (index sets, and the windows
of `where(i < 5)`-like thresholds), the periods, the leaves whose value is free (`same`: runtime ids;
`random`: a draw that changes with N), or a reason the mask is outside the fragment. `cases.py` turns a
profile into witness points; `primitives.py` computes the profile of each primitive.

>>> Profile(period=2, zones=((0, 0),)).merge(Profile(period=3, rows=((5, 5),)))
Profile(period=6, mixed=1, zones=((0, 0),), rows=((5, 5),), cols=(), atoms=frozenset(), reason=None)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Zones of d, special rows/columns (inclusive intervals), periods, free leaves, or why undecidable."""
    period: int = 1            # d-only parts: periodic in d with this period
    mixed: int = 1             # parts that also read i mod `mixed` (blocks, i // k, j % k)
    zones: tuple = ()          # (lo, hi) intervals of d where a threshold may switch
    rows: tuple = ()           # (lo, hi) intervals of special query indices
    cols: tuple = ()           # (lo, hi) intervals of special key indices
    atoms: frozenset = frozenset()   # free leaves: Same and Random nodes
    reason: str | None = None  # set when the mask is outside the fragment

    def merge(self, other: "Profile") -> "Profile":
        lcm = lambda x, y: x * y // math.gcd(x, y)   # noqa: E731
        return Profile(lcm(self.period, other.period), lcm(self.mixed, other.mixed), self.zones + other.zones,
                       self.rows + other.rows, self.cols + other.cols, self.atoms | other.atoms,
                       self.reason or other.reason)

    @property
    def cycle(self) -> int:
        """A period of the whole mask in d, i and j outside the zones and special rows/columns."""
        return self.period * self.mixed // math.gcd(self.period, self.mixed)


def merged(intervals) -> list[tuple[int, int]]:
    """Sorted, disjoint inclusive intervals covering the given ones (touching ones joined)."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def runs(idx) -> tuple[tuple[int, int], ...]:
    """An index set as inclusive runs of consecutive members: {0, 1, 2, 7} -> ((0, 2), (7, 7))."""
    return tuple(merged((x, x) for x in idx))
