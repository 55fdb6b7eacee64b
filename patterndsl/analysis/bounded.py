"""Bounded checks on tile layouts: the first pair of one mask missing from another at a given N.

Both masks are classified per tile in closed form (`plan/layout.tile_layout`); only tiles that are nonempty
in `a` and not full in `b` can hold a pair of `a` missing from `b`, and only their pairs are evaluated, in
order of their smallest `max(i, j)`, stopping once no later tile can hold a smaller pair.

>>> from patterndsl.ir import mask as M
>>> first_missing(M.CAUSAL, M.sliding(2), 64)
(3, 0)
>>> first_missing(M.sliding(1), M.sliding(2), 64) is None
True
"""
from __future__ import annotations

import torch

from ..ir import mask as M
from ..plan.layout import EMPTY, FULL, tile_layout
from ..plan.points import mask_at

CHUNK_PAIRS = 1 << 20     # pairs evaluated at once


def _classes_at(layout, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tile classes of `layout` at tiles (a, b) (0 where not listed)."""
    nkb = layout.shape[1]
    keys = layout.row_ids() * nkb + layout.col_idx
    want = a * nkb + b
    pos = torch.searchsorted(keys, want).clamp(max=max(keys.numel() - 1, 0))
    hit = (keys.numel() > 0) & (keys[pos] == want) if keys.numel() else torch.zeros_like(want, dtype=torch.bool)
    return torch.where(hit, layout.cls[pos] if keys.numel() else torch.zeros_like(want, dtype=torch.int8),
                       torch.tensor(EMPTY, dtype=torch.int8))


def _suspects(a: M.Mask, b: M.Mask, n: int, block: int):
    la, lb = tile_layout(a, n, n, block, block), tile_layout(b, n, n, block, block)
    ta, tb = la.row_ids(), la.col_idx
    keep = _classes_at(lb, ta, tb) != FULL
    ta, tb = ta[keep], tb[keep]
    order = torch.argsort(torch.maximum(ta, tb) * (la.shape[0] + 1) + ta, stable=True)
    return ta[order], tb[order]


def first_missing(a: M.Mask, b: M.Mask, n: int, block: int = 64) -> tuple[int, int] | None:
    """The pair (i, j), i, j < n, in `a` and not in `b` with the smallest (max(i, j), i, j), or None.

    The masks must read no runtime ids (substitute `same` first)."""
    if n < 1:
        return None
    block = max(1, min(block, n))
    ta, tb = _suspects(a, b, n, block)
    per = max(1, CHUNK_PAIRS // (block * block))
    best = None
    ar = torch.arange(block)
    for s in range(0, ta.numel(), per):
        ca, cb = ta[s:s + per], tb[s:s + per]
        if best is not None and int(torch.maximum(ca, cb).min()) * block > best[0]:
            break
        i = (ca * block)[:, None, None] + ar[None, :, None]
        j = (cb * block)[:, None, None] + ar[None, None, :]
        bad = (i < n) & (j < n) & mask_at(a, i, j, (n, n)) & ~mask_at(b, i, j, (n, n))
        if bad.any():
            ii, jj = torch.broadcast_tensors(i, j)
            ii, jj = ii[bad], jj[bad]
            key = torch.maximum(ii, jj) * (n * n) + ii * n + jj
            k = int(torch.argmin(key))
            cand = (int(torch.maximum(ii, jj)[k]), int(ii[k]), int(jj[k]))
            best = cand if best is None or cand < best else best
    return None if best is None else (best[1], best[2])
