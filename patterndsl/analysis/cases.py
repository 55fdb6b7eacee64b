"""Witness points: finitely many pairs (i, j) at which two masks agree exactly when they agree everywhere.

Given a profile (`profile.py`), every pair falls in one of three kinds, and each kind has finitely many
distinct behaviours:

- *generic* (i no special row, j no special column): the value is a function of `d = i - j` and `i mod m`
  (`m` = the profile's `mixed`), periodic in `d` with the profile's cycle `c` between zones. So the values of
  `d` in the zones, the first `c` of every gap between zones, and `c` more on either side, each paired with
  every residue of `i`, represent all of them; any such (d, r) is realised by the smallest
  `i >= max(special rows) + 1` with `i = r (mod m)` and `j = i - d` beyond the special columns.
- *a special row i0*: along j, the value is periodic with period `c` between the special columns and the
  zones moved to `j = i0 - d`; the same rule picks the points of j.
- *a special column j0*: the same with the roles of i and j swapped.

Pairs of every kind are evaluated with the real evaluator (`plan/points.mask_at`), so the only claim made
here is the periodicity argument above, which the tests check against brute force.

>>> from patterndsl.analysis.profile import Profile
>>> i, j = witnesses(Profile(zones=((-1, -1), (1, 1))))
>>> sorted(set((i - j).tolist()))
[-2, -1, 0, 1, 2]
"""
from __future__ import annotations

import torch

from .profile import Profile, merged

BUDGET = 1 << 22      # witness pairs we are willing to evaluate before falling back to a bounded check


class TooMany(Exception):
    """The profile needs more witness points than the budget allows."""


def line_points(intervals, period: int, start: int | None = None) -> torch.Tensor:
    """Points of a line (all integers, or those >= start) standing for every value of a function that is
    periodic with `period` on each gap between `intervals`: the intervals' points, the first `period` points
    of every gap, and `period` points past each end."""
    iv = merged((lo if start is None else max(lo, start), hi) for lo, hi in intervals
                if start is None or hi >= start)
    if not iv:
        base = 0 if start is None else start
        return torch.arange(base, base + period)
    pieces = []
    first = iv[0][0]
    lead = first - period if start is None else start
    pieces.append(torch.arange(lead, min(first, lead + period)))
    for k, (lo, hi) in enumerate(iv):
        nxt = iv[k + 1][0] if k + 1 < len(iv) else hi + 1 + period
        pieces.append(torch.arange(lo, hi + 1))
        pieces.append(torch.arange(hi + 1, min(nxt, hi + 1 + period)))
    return torch.cat(pieces)


def _members(intervals) -> torch.Tensor:
    iv = merged(intervals)
    return torch.cat([torch.arange(lo, hi + 1) for lo, hi in iv]) if iv else torch.zeros(0, dtype=torch.long)


def _check(count: int, budget: int) -> None:
    if count > budget:
        raise TooMany(f"{count} witness pairs")


def _special(fixed: torch.Tensor, other_specials, zones, cycle: int, sign: int, budget: int):
    """For each special row (sign=+1: j = i0 - d) or column (sign=-1: i = j0 + d): points of the other index."""
    out_fixed, out_other = [], []
    total = 0
    for x0 in fixed.tolist():
        moved = [(x0 - hi, x0 - lo) if sign > 0 else (x0 + lo, x0 + hi) for lo, hi in zones]
        pts = line_points(list(other_specials) + moved, cycle, start=0)
        total += pts.numel()
        _check(total, budget)
        out_fixed.append(torch.full_like(pts, x0))
        out_other.append(pts)
    if not out_fixed:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(out_fixed), torch.cat(out_other)


def witnesses(prof: Profile, budget: int = BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Int64 tensors (i, j) of witness pairs for `prof` (raises TooMany over `budget`)."""
    zones, cycle, m = merged(prof.zones), prof.cycle, prof.mixed
    rows, cols = _members(prof.rows), _members(prof.cols)
    _check(rows.numel() + cols.numel(), budget)
    i0 = int(rows.max()) + 1 if rows.numel() else 0
    j0 = int(cols.max()) + 1 if cols.numel() else 0
    d = line_points(zones, cycle)
    _check(d.numel() * m, budget)
    d = d.repeat_interleave(m)
    r = torch.arange(m).repeat(d.numel() // m)
    base = torch.clamp(j0 + d, min=i0)
    gi = base + torch.remainder(r - base, m)
    ri, rj = _special(rows, prof.cols, zones, cycle, +1, budget)
    cj, ci = _special(cols, prof.rows, zones, cycle, -1, budget)
    i = torch.cat([gi, ri, ci])
    j = torch.cat([gi - d, rj, cj])
    _check(i.numel(), budget)
    return i, j
