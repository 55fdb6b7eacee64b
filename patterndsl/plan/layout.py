"""Block layouts: each (BM x BN) tile of a mask classified as empty (0), partial (1) or full (2), in closed form.

Bands use interval arithmetic on `i - j` over the tile (with residues for dilated/strided bands), row and
column sets count their members per tile, blocks compare block-index ranges, `random` reads its block draw
through 2-D prefix sums; `where` and `same` fall back to evaluating the tile. Combinators combine classes:
a union is full if any part is, empty if all are; an intersection dually; a complement swaps full and empty.
The classes are exact where they say full or empty (a partial tile may happen to be full).

>>> from patterndsl.ir.mask import sliding
>>> block_layout(sliding(1), 8, 8, 4, 4).tolist()
[[1, 1], [1, 1]]
>>> block_layout(sliding(4), 8, 8, 4, 4).tolist()
[[2, 1], [1, 2]]
"""
from __future__ import annotations

import torch

from ..ir import mask as M
from ..ir.dense import dense_mask

EMPTY, PARTIAL, FULL = 0, 1, 2


class _Tiles:
    """First and last (inclusive) row/column index of every tile, as broadcastable [nqb, 1] / [1, nkb]."""

    def __init__(self, n_q: int, n_k: int, bm: int, bn: int):
        self.n_q, self.n_k, self.bm, self.bn = n_q, n_k, bm, bn
        self.nqb, self.nkb = -(-n_q // bm), -(-n_k // bn)
        a = torch.arange(self.nqb)
        b = torch.arange(self.nkb)
        self.r0 = (a * bm)[:, None]
        self.r1 = torch.clamp((a + 1) * bm, max=n_q)[:, None] - 1
        self.c0 = (b * bn)[None, :]
        self.c1 = torch.clamp((b + 1) * bn, max=n_k)[None, :] - 1

    def shape(self):
        return (self.nqb, self.nkb)


def block_layout(mask: M.Mask, n_q: int, n_k: int, block_m: int = 64, block_n: int = 64,
                 runtime: dict | None = None) -> torch.Tensor:
    """int8 `[ceil(n_q/BM), ceil(n_k/BN)]`: 0 empty, 1 partial, 2 full (the element mask needed only on 1)."""
    if n_q <= 0 or n_k <= 0:
        return torch.zeros(max(0, -(-n_q // block_m)), max(0, -(-n_k // block_n)), dtype=torch.int8)
    t = _Tiles(n_q, n_k, block_m, block_n)
    return _classify(mask, t, runtime).to(torch.int8)


def _const(t: _Tiles, value: int) -> torch.Tensor:
    return torch.full(t.shape(), value, dtype=torch.int8)


def _classify(m: M.Mask, t: _Tiles, runtime) -> torch.Tensor:
    if isinstance(m, M.Full):
        return _const(t, FULL)
    if isinstance(m, M.Empty):
        return _const(t, EMPTY)
    if isinstance(m, M.Band):
        return _band(m, t)
    if isinstance(m, (M.Rows, M.Cols)):
        return _index_set(m, t)
    if isinstance(m, M.Blocks):
        return _blocks(m.size, t)
    if isinstance(m, M.Random):
        return _random(m, t)
    if isinstance(m, (M.Where, M.Same)):
        return _evaluate(m, t, runtime)
    if isinstance(m, M.Union):
        parts = [_classify(p, t, runtime) for p in m.parts]
        full = torch.stack([p == FULL for p in parts]).any(0)
        empty = torch.stack([p == EMPTY for p in parts]).all(0)
        return _combine(full, empty)
    if isinstance(m, M.Inter):
        parts = [_classify(p, t, runtime) for p in m.parts]
        full = torch.stack([p == FULL for p in parts]).all(0)
        empty = torch.stack([p == EMPTY for p in parts]).any(0)
        return _combine(full, empty)
    if isinstance(m, M.Not):
        return (FULL - _classify(m.part, t, runtime)).to(torch.int8)
    raise TypeError(f"not a mask: {m!r}")


def _combine(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    out = torch.full(full.shape, PARTIAL, dtype=torch.int8)
    out[full] = FULL
    out[empty] = EMPTY
    return out


def _band(m: M.Band, t: _Tiles) -> torch.Tensor:
    dmin, dmax = t.r0 - t.c1, t.r1 - t.c0            # the range of i - j over the tile
    lo = m.lo if m.lo is not None else -(1 << 62)
    hi = m.hi if m.hi is not None else 1 << 62
    a, b = torch.maximum(dmin, torch.tensor(lo)), torch.minimum(dmax, torch.tensor(hi))
    if m.step == 1:
        empty = a > b
        full = (dmin >= lo) & (dmax <= hi)
    else:  # some multiple of step in [a, b]?  full only for single pairs on a multiple
        first = -torch.div(-a, m.step, rounding_mode="floor") * m.step
        empty = first > b
        full = (dmin == dmax) & (dmin >= lo) & (dmax <= hi) & (torch.remainder(dmin, m.step) == 0)
    return _combine(full, empty)


def _counts(idx: frozenset, n: int, block: int, nb: int) -> torch.Tensor:
    inside = torch.tensor(sorted(x for x in idx if x < n), dtype=torch.long)
    return torch.bincount(inside // block, minlength=nb)[:nb] if inside.numel() else torch.zeros(nb, dtype=torch.long)


def _index_set(m, t: _Tiles) -> torch.Tensor:
    if isinstance(m, M.Rows):
        count = _counts(m.idx, t.n_q, t.bm, t.nqb)[:, None]
        height = (t.r1 - t.r0 + 1)
        full, empty = count == height, count == 0
    else:
        count = _counts(m.idx, t.n_k, t.bn, t.nkb)[None, :]
        width = (t.c1 - t.c0 + 1)
        full, empty = count == width, count == 0
    return _combine(full.expand(t.shape()), empty.expand(t.shape()))


def _blocks(size: int, t: _Tiles) -> torch.Tensor:
    qa, qb = t.r0 // size, t.r1 // size
    ka, kb = t.c0 // size, t.c1 // size
    empty = (qb < ka) | (kb < qa)
    full = (qa == qb) & (ka == kb) & (qa == ka)
    return _combine(full, empty)


def _random(m: M.Random, t: _Tiles) -> torch.Tensor:
    chosen = M.random_blocks(m.count, m.block, m.seed, t.n_q, t.n_k)
    nrq, nrk = -(-t.n_q // m.block), -(-t.n_k // m.block)
    grid = torch.zeros(nrq, nrk, dtype=torch.long)
    if chosen.numel():
        grid.scatter_(1, chosen, 1)
    pre = torch.zeros(nrq + 1, nrk + 1, dtype=torch.long)
    pre[1:, 1:] = grid.cumsum(0).cumsum(1)
    qa, qb = t.r0 // m.block, t.r1 // m.block + 1       # block-index rectangle of each tile
    ka, kb = t.c0 // m.block, t.c1 // m.block + 1
    total = pre[qb, kb] - pre[qa, kb] - pre[qb, ka] + pre[qa, ka]
    area = (qb - qa) * (kb - ka)
    return _combine(total == area, total == 0)


def _evaluate(m: M.Mask, t: _Tiles, runtime) -> torch.Tensor:
    """Per-tile reduction of the dense mask (vectorised; used for `where` and `same`)."""
    if isinstance(m, M.Same) and not runtime:
        return _const(t, PARTIAL)  # runtime ids unknown: any tile may hold allowed pairs
    dense = dense_mask(m, t.n_q, t.n_k, runtime)
    some, every = (dense.any(0), dense.all(0)) if dense.dim() == 3 else (dense, dense)  # one layout per batch
    return _combine(~_tile_any(~every, t), ~_tile_any(some, t))


def _tile_any(dense: torch.Tensor, t: _Tiles) -> torch.Tensor:
    pad = torch.zeros(t.nqb * t.bm, t.nkb * t.bn, dtype=torch.bool)
    pad[:t.n_q, :t.n_k] = dense
    return pad.view(t.nqb, t.bm, t.nkb, t.bn).any(3).any(1)


def tile_lists(layout: torch.Tensor):
    """CSR form of a layout: (row_ptr [nqb+1], col_idx [nnz], is_full [nnz]) of its nonempty tiles."""
    nz = layout != EMPTY
    row_ptr = torch.zeros(layout.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = nz.sum(1).cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)
    return row_ptr, cols.to(torch.int32), layout[rows, cols] == FULL
