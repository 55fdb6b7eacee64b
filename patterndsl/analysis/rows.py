"""Rows with no allowed key: which query rows of a mask are empty, and for which N.

Row i exists for N > i and gains keys as N grows, so it is empty exactly for `i < N <= f(i)`, where `f(i)`
is its first allowed key after the diagonal part `j <= i` is found empty (`f(i) = inf`: empty for every N).
For a mask in the decidable fragment, rows past `start = max(special rows, special columns + zones) + cycle`
repeat with the profile's cycle `c`: whether row i has a key `j <= i`, and `f(i) - i`, depend on `i mod c`
only. So rows below `start + c` are computed exactly (their keys `j <= i` by evaluation, `f(i)` on the
witness points of that row), and the rest follow by period.

>>> from patterndsl.ir import mask as M
>>> print(empty_rows(M.band(1, 3)))        # strictly earlier keys: row 0 has none
row 0: for every N
>>> print(empty_rows(M.band(-2, -1)))      # strictly later keys: the last row has none
every row: while N <= i + 1 (the last row)
>>> print(empty_rows(M.sliding(2)))
none, for every N
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir import mask as M
from ..plan.points import mask_at
from .cases import line_points
from .primitives import profile
from .profile import merged

MAX_ROWS = 1 << 13     # rows computed exactly before the period takes over (else: no answer for every N)


@dataclass(frozen=True)
class RowGroup:
    """Rows from `first` to `last` (None: unbounded) with `i mod step` in `residues`, empty for `i < N <= until`
    where `until` is `limit` (absolute), `i + limit` (`relative`), or every N (`limit` None)."""
    first: int
    last: int | None
    limit: int | None
    relative: bool = False
    step: int = 1
    residues: tuple = (0,)

    def rows(self) -> str:
        if self.last == self.first:
            return f"row {self.first}"
        if self.last is not None:
            return f"rows {self.first}..{self.last}"
        res = ""
        if self.step > 1:
            res = (f"i mod {self.step} = {self.residues[0]}" if len(self.residues) == 1 else
                   f"i mod {self.step} in {{{', '.join(map(str, self.residues))}}}")
        if self.first < self.step:
            return f"rows with {res}" if res else "every row"
        return f"rows i >= {self.first}" + (f" with {res}" if res else "")

    def when(self) -> str:
        if self.limit is None:
            return "for every N"
        if self.relative:
            last = "the last row" if self.limit == 1 else f"the last {self.limit} rows"
            return f"while N <= i + {self.limit} ({last})"
        return f"while N <= {self.limit}"

    def empty_at(self, i: int, n: int) -> bool:
        inside = i >= self.first and (self.last is None or i <= self.last) and i % self.step in self.residues
        if not inside or i >= n:
            return False
        return self.limit is None or n <= (i + self.limit if self.relative else self.limit)


@dataclass(frozen=True)
class EmptyRows:
    """Every row that is empty for some N (`groups`), proved for every N."""
    groups: tuple[RowGroup, ...]

    def empty_at(self, i: int, n: int) -> bool:
        return any(g.empty_at(i, n) for g in self.groups)

    def __str__(self) -> str:
        if not self.groups:
            return "none, for every N"
        return "; ".join(f"{g.rows()}: {g.when()}" for g in self.groups)


def _start(m: M.Mask):
    prof = profile(m)
    zones = merged(prof.zones + ((0, 0),))
    span = max(max(abs(lo), abs(hi)) for lo, hi in zones)
    top = max([hi for _, hi in merged(prof.rows + prof.cols)] + [0])
    return prof, top + span + 2 * prof.cycle + 2


def _has_earlier_key(m: M.Mask, n: int) -> torch.Tensor:
    """Bool [n]: row i has an allowed key j <= i."""
    out = torch.zeros(n, dtype=torch.bool)
    step = max(1, (1 << 20) // max(n, 1))
    for a in range(0, n, step):
        i = torch.arange(a, min(n, a + step))[:, None]
        j = torch.arange(n)[None, :]
        out[a:a + i.shape[0]] = (mask_at(m, i, j, (n, n)) & (j <= i)).any(1)
    return out


def _first_later_key(m: M.Mask, prof, i: int) -> int | None:
    """The first allowed key j > i of row i (None: none at any N), from the witness points of row i."""
    zones = [(i - hi, i - lo) for lo, hi in merged(prof.zones)]
    pts = line_points(list(prof.cols) + zones + [(i + 1, i + 1)], prof.cycle, start=i + 1)
    ok = mask_at(m, torch.full_like(pts, i), pts, (int(pts.max()) + 1,) * 2)
    return int(pts[ok].min()) if ok.any() else None


def empty_rows(m: M.Mask) -> EmptyRows | None:
    """The empty rows of `m` for every N, or None when `m` is outside the fragment (or too large)."""
    prof, start = _start(m)
    if prof.reason or prof.atoms or start + prof.cycle > MAX_ROWS:
        return None
    c = prof.cycle
    n = start + c
    empty = ~_has_earlier_key(m, n)
    limits = {i: _first_later_key(m, prof, i) for i in empty.nonzero().flatten().tolist()}
    periodic = _periodic_groups(limits, start, c)
    finite = _finite_groups({i: f for i, f in limits.items() if i < start})
    return EmptyRows(tuple(_joined(finite + periodic)))


def _same_rule(g: RowGroup, i: int, f: int | None) -> bool:
    if f is None or g.limit is None:
        return f is None and g.limit is None
    return f - i == g.limit if g.relative else f == g.limit


def _finite_groups(limits: dict) -> list[RowGroup]:
    """Consecutive rows with the same absolute or relative limit, as groups."""
    groups: list[RowGroup] = []
    for i in sorted(limits):
        f, g = limits[i], groups[-1] if groups else None
        if g is not None and g.last == i - 1:
            if _same_rule(g, i, f):
                groups[-1] = RowGroup(g.first, i, g.limit, g.relative)
                continue
            if g.first == g.last and f is not None and g.limit is not None and f - i == g.limit - g.first:
                groups[-1] = RowGroup(g.first, i, f - i, True)
                continue
        groups.append(RowGroup(i, i, f))
    return groups


def _rule(limits: dict, i: int):
    f = limits[i]
    return None if f is None else f - i


def _periodic_groups(limits: dict, start: int, c: int) -> list[RowGroup]:
    """Groups for the rows that repeat with period c from `start` on, each extended down through the rows
    below `start` that follow the same rule (those are removed from `limits`)."""
    firsts = {}
    for r in range(start, start + c):
        if r not in limits:
            continue
        x = r
        while x - c >= 0 and x - c in limits and _rule(limits, x - c) == _rule(limits, r):
            x -= c
        firsts[r] = x
    by_rule: dict = {}
    for r, x in firsts.items():
        key = _rule(limits, r) if x < c else ("alone", r)
        by_rule.setdefault(key, []).append((r, x))
    groups = []
    for members in by_rule.values():
        res = tuple(sorted(r % c for r, _ in members))
        k = _rule(limits, members[0][0])
        step, res = (1, (0,)) if len(res) == c else (c, res)
        groups.append(RowGroup(min(x for _, x in members), None, k, k is not None, step, res))
    for r, x in firsts.items():
        for y in range(x, start, c):
            limits.pop(y, None)
    return groups


def _joined(groups: list[RowGroup]) -> list[RowGroup]:
    """A finite run that ends where an unbounded group of the same rule starts joins it (step 1 only)."""
    out: list[RowGroup] = []
    for g in sorted(groups, key=lambda g: g.first):
        prev = out[-1] if out else None
        if (prev is not None and g.last is None and g.step == 1 and prev.last == g.first - 1
                and prev.limit == g.limit and (prev.relative == g.relative or g.limit is None)):
            out[-1] = RowGroup(prev.first, None, g.limit, g.relative)
        else:
            out.append(g)
    return out
