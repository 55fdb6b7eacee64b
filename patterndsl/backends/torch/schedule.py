"""The block-sparse schedule of a softmax stage: work items (a query tile and up to `split` of its key tiles)
grouped into chunks that are each one batched matmul.

From the closed-form `TileLayout`, every query tile's list of nonempty key tiles is cut into items of at most
`split` tiles (`plan/schedule.py`, shared with the Triton backend), so a skewed row (a global token sees every
key) becomes several items merged afterwards by log-sum-exp instead of padding every row of the gather to
the longest. Items are sorted by length and packed
into chunks of `C` items x `T` tiles holding about `budget` scores, so the padding waste stays small and the
working set stays bounded (memory O(chunk), never N x N). Partial tiles (and the ragged last key tile) carry
their element masks, evaluated once per schedule; full tiles are never masked.

>>> from patterndsl.ir.mask import sliding, cols
>>> s = make_schedule(sliding(8) | cols({0}), 64, 64, 16, 16, heads=1, split=2)
>>> [(c.q_tiles.tolist(), c.k_tiles.tolist()) for c in s.chunks]     # key tile 4 = the zero padding tile
[([0, 1, 2, 2, 3, 1, 3], [[0, 1], [0, 1], [0, 1], [2, 3], [0, 2], [2, 4], [3, 4]])]
>>> s.groups.tolist(), s.group_tiles.tolist()    # query tiles 1, 2, 3 were split in two: their result slots
([[0, 4], [1, 2], [3, 5]], [1, 2, 3])
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...ir import mask as M
from ...ir.dense import mask_at
from ...plan.layout import PARTIAL, tile_layout
from ...plan.schedule import tile_classes, work_items
from ...plan.tiles import Grid

BUDGET = 1 << 20   # scores per chunk (all batch rows and heads together): 4 MB of fp32, cache-sized


@dataclass(frozen=True)
class Chunk:
    q_tiles: torch.Tensor        # int64 [C]: the query tile of each item
    k_tiles: torch.Tensor        # int64 [C, T]: key tiles (nkb = the zero padding tile)
    direct: torch.Tensor         # int64: items that are their tile's only item (written straight out)
    split: torch.Tensor          # int64: items of split tiles
    slots: torch.Tensor          # int64: the partial-result slot of each split item
    pad: tuple                   # (item, position) of padding tiles
    partial: tuple               # (item, position) of partial tiles
    masks: torch.Tensor | None   # bool [P, bm, bn] (or [B, P, bm, bn]) element masks of the partial tiles

    @property
    def unmasked(self) -> bool:
        return self.pad[0].numel() == 0 and self.partial[0].numel() == 0

    def allowed(self, bm: int, bn: int) -> torch.Tensor:
        """bool `[C, bm, T * bn]` (or `[B, C, bm, T * bn]`): which scores of the chunk are allowed."""
        C, T = self.k_tiles.shape
        lead = self.masks.shape[:1] if self.masks is not None and self.masks.dim() == 4 else ()
        out = torch.ones(*lead, C, bm, T, bn, dtype=torch.bool, device=self.k_tiles.device)
        pi, pp = self.pad
        out[..., pi, :, pp, :] = False
        if self.masks is not None:
            qi, qp = self.partial
            if lead:
                out[:, qi, :, qp, :] = self.masks.transpose(0, 1)
            else:
                out[qi, :, qp, :] = self.masks
        return out.view(*lead, C, bm, T * bn)


@dataclass(frozen=True)
class Schedule:
    grid: Grid
    chunks: tuple[Chunk, ...]
    slots: int                    # partial results of split items
    groups: torch.Tensor          # int64 [G, P]: the slots of each split tile (slots = an empty slot)
    group_tiles: torch.Tensor     # int64 [G]: the query tile each group merges into
    nonempty: torch.Tensor        # bool [nqb]: query tiles with at least one key tile

    def to(self, device) -> "Schedule":
        def mv(x):
            return tuple(mv(y) for y in x) if isinstance(x, tuple) else x.to(device) if x is not None else None
        chunks = tuple(Chunk(*(mv(getattr(c, f)) for f in Chunk.__dataclass_fields__)) for c in self.chunks)
        return Schedule(self.grid, chunks, self.slots, self.groups.to(device), self.group_tiles.to(device),
                        self.nonempty.to(device))


def make_schedule(mask: M.Mask, n_q: int, n_k: int, bm: int, bn: int, heads: int, split: int | None = None,
                  runtime: dict | None = None, budget: int = BUDGET, q_offset: int = 0) -> Schedule:
    """The schedule of `mask` at `n_q x n_k` in `bm x bn` tiles for `heads` = B * H problems at once.
    `split` caps the key tiles of one item (None: twice the mean nonempty row, at least 8); query row r is at
    position `q_offset + r`."""
    if runtime is None or not M.runtime_inputs(mask):
        return _cached(mask, n_q, n_k, bm, bn, heads, split, budget, q_offset)
    return _build(mask, n_q, n_k, bm, bn, heads, split, runtime, budget, q_offset)


@functools.lru_cache(maxsize=64)
def _cached(mask, n_q, n_k, bm, bn, heads, split, budget, q_offset) -> Schedule:
    return _build(mask, n_q, n_k, bm, bn, heads, split, None, budget, q_offset)


def _build(mask, n_q, n_k, bm, bn, heads, split, runtime, budget, q_offset) -> Schedule:
    layout = tile_layout(mask, n_q, n_k, bm, bn, runtime, q_offset)
    g = layout.grid
    cls = tile_classes(layout)                             # the ragged key tile is bound-checked
    items = work_items(layout.row_ptr[:-1], layout.row_ptr[1:], split, empty_items=False)
    tile, start, end, slot = items.block, items.start, items.end, items.slot
    chunks, i = [], 0
    while i < tile.numel():
        width = int(end[i] - start[i])
        count = max(1, budget // max(1, heads * bm * bn * width))
        sl = slice(i, min(i + count, tile.numel()))
        chunks.append(_chunk(mask, g, layout.col_idx, cls, tile[sl], start[sl], end[sl], slot[sl], width,
                             runtime))
        i = sl.stop
    groups = items.groups.masked_fill(items.groups < 0, items.slots)   # padding points at the empty slot
    return Schedule(g, tuple(chunks), items.slots, groups, items.group_blocks, layout.row_ptr.diff() > 0)


def _chunk(mask, g: Grid, col_idx, cls, tile, start, end, slot, width, runtime) -> Chunk:
    pos = start[:, None] + torch.arange(width)
    live = pos < end[:, None]
    pos = pos.clamp(max=max(col_idx.numel() - 1, 0))
    k_tiles = torch.where(live, col_idx[pos], g.nkb)
    kcls = torch.where(live, cls[pos], 0)
    pad = (~live).nonzero(as_tuple=True)
    partial = (live & (kcls == PARTIAL)).nonzero(as_tuple=True)
    masks = None
    if partial[0].numel():
        i = (tile[partial[0]] * g.bm)[:, None, None] + torch.arange(g.bm)[None, :, None]
        j = (k_tiles[partial] * g.bn)[:, None, None] + torch.arange(g.bn)[None, None, :]
        masks = mask_at(mask, i, j, (g.n_q, g.n_k), runtime, g.q_offset) & (j < g.n_k)
    direct = (slot < 0).nonzero().flatten()
    split = (slot >= 0).nonzero().flatten()
    return Chunk(tile, k_tiles, direct, split, slot[split], pad, partial, masks)
