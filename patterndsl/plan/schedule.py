"""Work items of a block-sparse schedule, shared by the backends: rows of tiles cut into pieces, pieces merged.

A block-sparse kernel walks, for every query block (or key block, in a backward), a range of tiles: a range
into the CSR of a `TileLayout`, or an arithmetic range of other-side blocks for a band. `work_items` cuts
every range longer than `split` into pieces of at most `split` tiles (so a skewed row, a global token that
sees every key, runs as several items in parallel instead of one long one), sorts the items longest first,
gives each piece of a cut block a partial-result slot, and lists each cut block's slots in `groups`; the
pieces' results are merged by log-sum-exp (`merge_by_lse`). `tile_classes` gives the classes the kernels
use: the layout's, with the ragged last key tile partial (keys are bound-checked only there).

>>> import torch
>>> items = work_items(torch.tensor([0, 1, 3]), torch.tensor([1, 3, 6]), split=2)
>>> items.block.tolist(), items.start.tolist(), items.end.tolist(), items.slot.tolist()
([1, 2, 0, 2], [1, 3, 0, 5], [3, 5, 1, 6], [-1, 0, -1, 1])
>>> items.groups.tolist(), items.group_blocks.tolist()
([[0, 1]], [2])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.masks import PARTIAL
from .tiles import TileLayout

NEG_INF = float("-inf")


@dataclass(frozen=True)
class WorkItems:
    """Items sorted longest first: item w walks `start[w]:end[w]` of block `block[w]`; `slot[w]` is -1 for a
    block's only item (written straight out) or its partial-result slot. `groups[g]` lists the slots of the
    g-th cut block `group_blocks[g]` (-1 pads)."""
    block: torch.Tensor         # int64 [W]
    start: torch.Tensor         # int64 [W]
    end: torch.Tensor           # int64 [W]
    slot: torch.Tensor          # int64 [W]
    slots: int
    groups: torch.Tensor        # int64 [G, P]
    group_blocks: torch.Tensor  # int64 [G]

    @property
    def longest(self) -> int:
        """Most tiles one item walks."""
        return int((self.end - self.start).max()) if self.end.numel() else 0


def default_split(lengths: torch.Tensor) -> int:
    """Twice the mean length of the nonempty ranges (rounded up), at least 8."""
    busy = lengths[lengths > 0]
    return max(8, 2 * -(-int(busy.sum()) // max(busy.numel(), 1)))


def work_items(starts: torch.Tensor, ends: torch.Tensor, split: int | None = None,
               empty_items: bool = True) -> WorkItems:
    """Block b's range `starts[b]:ends[b]` cut into items of at most `split` tiles (None: `default_split`);
    with `empty_items` an empty range still gives one (empty) item, so that its block writes its zeros."""
    starts, ends = starts.long(), ends.long()
    length = (ends - starts).clamp(min=0)
    split = default_split(length) if split is None else split
    pieces = -(-length // split)
    pieces = pieces.clamp(min=1) if empty_items else pieces
    block = torch.repeat_interleave(torch.arange(length.numel()), pieces)
    k = torch.arange(block.numel()) - (torch.cumsum(pieces, 0) - pieces)[block]
    start = starts[block] + k * split
    end = torch.maximum(torch.minimum(start + split, ends[block]), start)
    order = torch.argsort(end - start, descending=True, stable=True)
    block, start, end = block[order], start[order], end[order]
    cut = pieces[block] > 1
    slot = torch.full_like(block, -1)
    slot[cut] = torch.arange(int(cut.sum()))
    groups, group_blocks = _groups(block, slot)
    return WorkItems(block, start, end, slot, int(cut.sum()), groups, group_blocks)


def _groups(block: torch.Tensor, slot: torch.Tensor):
    """The slots of each cut block (ascending blocks; slots in item order), padded with -1."""
    sel = slot >= 0
    if not bool(sel.any()):
        return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    b, s = block[sel], slot[sel]
    group_blocks, inverse, counts = torch.unique(b, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    rank = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[inverse[order]]
    groups = torch.full((group_blocks.numel(), int(counts.max())), -1, dtype=torch.long)
    groups[inverse[order], rank] = s[order]
    return groups, group_blocks


def tile_classes(layout: TileLayout) -> torch.Tensor:
    """The layout's classes `[nnz]` with tiles of the ragged last key tile partial (the kernels bound-check
    keys only on partial tiles)."""
    cls = layout.cls.clone()
    if layout.n_k % layout.block_n:
        cls[layout.col_idx == layout.grid.nkb - 1] = PARTIAL
    return cls


def merge_by_lse(out: torch.Tensor, lse: torch.Tensor, dim: int):
    """Merge pieces of rows along `dim`: each piece's normalised output `out` (one more trailing dim than
    `lse`) and log-sum-exp `lse`; a missing piece has lse -inf and out 0. Returns (out, lse) of the whole rows; a row
    with no allowed key gets out 0 and lse -inf."""
    total = torch.logsumexp(lse, dim=dim)
    w = torch.exp(lse - total.masked_fill(total == NEG_INF, 0.0).unsqueeze(dim))
    return (w.unsqueeze(-1) * out).sum(dim), total
