"""Token sets as sorted, disjoint runs `[start, end]` (int64 tensors), and a band hop done on runs alone.

A receptive field is usually a few runs (a window grows one run; global tokens add a few), so a band hop on
runs costs O(runs), not O(N): a run of at least `step` tokens reaches one run `[a - hi, b - lo]`; shorter
runs reach, per token, the multiples of the step in its window.

>>> s, e = band_runs(torch.tensor([10]), torch.tensor([12]), lo=-2, hi=2, step=1, n=100)
>>> s.tolist(), e.tolist()
([8], [14])
>>> s, e = band_runs(torch.tensor([50]), torch.tensor([50]), lo=-4, hi=4, step=2, n=100)
>>> s.tolist()
[46, 48, 50, 52, 54]
"""
from __future__ import annotations

import torch

MAX_POINTS = 1 << 20    # points from short runs before a band hop hands over to bit vectors


def runs(bits: torch.Tensor):
    """Inclusive (start, end) of the maximal runs of True in a bool vector."""
    edges = torch.diff(bits.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    return (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten() - 1


def to_bits(start: torch.Tensor, end: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [n] holding the runs (clipped to 0..n-1; runs with start > end are empty)."""
    start, end = start.clamp(min=0), end.clamp(max=n - 1)
    keep = start <= end
    diff = torch.zeros(n + 1, dtype=torch.long)
    diff.index_add_(0, start[keep], torch.ones_like(start[keep]))
    diff.index_add_(0, end[keep] + 1, -torch.ones_like(end[keep]))
    return torch.cumsum(diff[:n], 0) > 0


def merge(start: torch.Tensor, end: torch.Tensor, n: int):
    """Runs clipped to 0..n-1, sorted, with overlapping or touching runs joined."""
    start, end = start.clamp(min=0), end.clamp(max=n - 1)
    keep = start <= end
    start, end = start[keep], end[keep]
    if start.numel() == 0:
        return start, end
    order = torch.argsort(start)
    start, end = start[order], end[order]
    reach = torch.cummax(end, 0).values
    new = torch.ones_like(start, dtype=torch.bool)
    new[1:] = start[1:] > reach[:-1] + 1
    group = torch.cumsum(new.long(), 0) - 1
    out_end = torch.full((int(group[-1]) + 1,), -1, dtype=torch.long).scatter_reduce(0, group, end, "amax")
    return start[new], out_end


def band_runs(start, end, lo, hi, step: int, n: int):
    """Runs of the keys `x - d` (lo <= d <= hi, d a multiple of step; None unbounded) for x in the runs,
    keys in 0..n-1; None when short runs would expand to more than MAX_POINTS points."""
    long = (end - start + 1) >= step
    a = start[long] - hi if hi is not None else torch.zeros_like(start[long])
    b = end[long] - lo if lo is not None else torch.full_like(end[long], n - 1)
    short = _short_runs(start[~long], end[~long], lo, hi, step, n)
    if short is None:
        return None
    return merge(torch.cat([a, short[0]]), torch.cat([b, short[1]]), n)


def _short_runs(start, end, lo, hi, s: int, n: int):
    """Runs shorter than the step, on the lattice of the step: a token x is (class c, t) = (x % s, x // s),
    a band moves t by [-hi/s, -lo/s] within its class; consecutive t of a class are one run there."""
    lens = end - start + 1
    if int(lens.sum()) > MAX_POINTS:
        return None
    x = torch.repeat_interleave(start, lens) + _ramp(lens)
    c, t = x % s, x // s
    width = (max(n, int(x.max()) + 1) if x.numel() else n) // s + 2     # one spare t: classes never touch
    t0, t1 = merge(c * width + t, c * width + t, width * s)             # runs of t within each class
    c = t0 // width
    t_max = (n - 1 - c) // s                                            # last t of class c inside 0..n-1
    lo_t = t0 % width - hi // s if hi is not None else torch.zeros_like(t0)
    hi_t = t1 % width - lo // s if lo is not None else t_max
    lo_t, hi_t = lo_t.clamp(min=0), torch.minimum(hi_t, t_max)
    count = (hi_t - lo_t + 1).clamp(min=0)
    if int(count.sum()) > MAX_POINTS:
        return None
    pts = (torch.repeat_interleave(c + s * lo_t, count) + _ramp(count) * s)
    return pts, pts


def _ramp(lens: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., lens[0]-1, 0, 1, ..., lens[1]-1, ..."""
    total = int(lens.sum())
    offsets = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return torch.arange(total) - offsets
