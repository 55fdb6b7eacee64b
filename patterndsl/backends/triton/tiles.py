"""Tile schedules for the block-sparse kernels: which tiles each program walks, split so no program walks long.

A `WorkList` is what one kernel launch iterates: row `w` of `work` (int32 `[W, 4]`) is one program's
`(block, start, end, slot)`. For bands and `full` (`band=True`) `start:end` is a range of *other-side block
indices*, computed by interval arithmetic (no tile table); otherwise it is a range into `tiles`, the CSR list
of nonempty tiles from the block layout, each coded `other_block * 2 + is_full`. A block whose list is longer
than `split` tiles (global rows, or global columns in the backward) is cut into pieces that run in parallel;
each piece writes into partial slot `slot` (-1: the block is not split, write the result directly), and
`groups[g]` lists the slots of the g-th split block `group_block[g]`, merged by log-sum-exp (forward) or summed
(gradients).

>>> from patterndsl.ir.mask import CAUSAL
>>> plan = make_plan(CAUSAL, 64, 64, 16, 16, split=2)
>>> sorted(plan.rows.work.tolist())   # query block 3 walks key blocks 0..3 in two pieces, slots 2 and 3
[[0, 0, 1, -1], [1, 0, 2, -1], [2, 0, 2, 0], [2, 2, 3, 1], [3, 0, 2, 2], [3, 2, 4, 3]]
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...ir import mask as M
from ...plan.layout import band_bounds, block_layout, tile_lists
from ..custom import runtime_ids
from .codegen import data_leaves, header_slots, is_band


@dataclass(frozen=True)
class WorkList:
    work: torch.Tensor         # int32 [W, 4]: block, start, end, slot
    tiles: torch.Tensor        # int32 [T]: other_block * 2 + is_full (empty in band mode)
    slots: int                 # number of partial-result slots
    groups: torch.Tensor       # int64 [G, S]: the slots of each split block (-1 pads)
    group_block: torch.Tensor  # int64 [G]: which block each group merges into
    longest: int               # most tiles one program walks

    def to(self, device) -> "WorkList":
        return WorkList(self.work.to(device), self.tiles.to(device), self.slots, self.groups.to(device),
                        self.group_block.to(device), self.longest)


@dataclass(frozen=True)
class TilePlan:
    """The schedule of one softmax stage at one shape: row work (forward, dq) and column work (dk, dv)."""
    block_m: int
    block_n: int
    n_q: int
    n_k: int
    band: bool
    rows: WorkList
    cols: WorkList

    def describe(self) -> str:
        mode = "band bounds" if self.band else f"tile list ({self.rows.tiles.numel()} tiles)"
        return (f"TilePlan {self.n_q}x{self.n_k} tiles {self.block_m}x{self.block_n}, {mode}: "
                f"{self.rows.work.shape[0]} row programs (longest {self.rows.longest} tiles, "
                f"{self.rows.group_block.numel()} split), {self.cols.work.shape[0]} column programs "
                f"(longest {self.cols.longest}, {self.cols.group_block.numel()} split)")


# ----------------------------------------------------------------------------------------- classes
def tile_classes(mask: M.Mask, n_q: int, n_k: int, bm: int, bn: int, runtime=None) -> torch.Tensor:
    """The closed-form block layout (int8 `[nqb, nkb]`: 0 empty, 1 partial, 2 full), with tiles cut by a
    ragged key edge counted partial (the kernels bound-check keys only there)."""
    cls = block_layout(mask, n_q, n_k, bm, bn, runtime=runtime).clone()
    if n_k % bn and cls.numel():
        cls[:, -1] = cls[:, -1].clamp(max=1)
    return cls


# ------------------------------------------------------------------------------------------ ranges
def _band_ranges(band: M.Band, n_q: int, n_k: int, bm: int, bn: int, by: str):
    """Per query block (`by="rows"`) or key block (`by="cols"`), the range [start, end) of the other side's
    blocks that meet the band: the layout's arithmetic loop bounds, end = start when none do."""
    first, last = band_bounds(band, n_q, n_k, bm, bn, by)
    return first, last + 1


def _csr(cls: torch.Tensor):
    """The layout's CSR as (starts, ends, codes `other_block * 2 + is_full`)."""
    row_ptr, col_idx, is_full = tile_lists(cls)
    row_ptr = row_ptr.long()
    return row_ptr[:-1], row_ptr[1:], col_idx.long() * 2 + is_full.long()


def _split(starts: torch.Tensor, ends: torch.Tensor, tiles: torch.Tensor, split: int | None) -> WorkList:
    lengths = ends - starts
    if split is None:
        nonempty = lengths[lengths > 0]
        mean = float(nonempty.float().mean()) if nonempty.numel() else 1.0
        split = max(8, 2 * int(-(-mean // 1)))
    pieces = torch.clamp(-(-lengths // split), min=1)
    blk = torch.repeat_interleave(torch.arange(lengths.numel()), pieces)
    first = torch.cumsum(pieces, 0) - pieces
    k = torch.arange(blk.numel()) - first[blk]
    s = starts[blk] + k * split
    e = torch.minimum(s + split, ends[blk])
    e = torch.maximum(e, s)
    is_split = pieces[blk] > 1
    slot = torch.full_like(blk, -1)
    slot[is_split] = torch.arange(int(is_split.sum()))
    split_blocks = torch.nonzero(pieces > 1).flatten()
    width = int(pieces.max()) if split_blocks.numel() else 0
    groups = torch.full((split_blocks.numel(), width), -1, dtype=torch.long)
    if split_blocks.numel():
        sel = torch.nonzero(is_split).flatten()
        row = torch.searchsorted(split_blocks, blk[sel])
        groups[row, k[sel]] = slot[sel]
    work = torch.stack([blk, s, e, slot], 1)
    work = work[torch.argsort(e - s, descending=True, stable=True)]  # longest first
    return WorkList(work.to(torch.int32).contiguous(), tiles.to(torch.int32).contiguous(), int(is_split.sum()),
                    groups, split_blocks, int((e - s).max()) if e.numel() else 0)


# -------------------------------------------------------------------------------------------- plans
def _build(mask, n_q, n_k, bm, bn, split, runtime) -> TilePlan:
    if is_band(mask):
        band = mask if isinstance(mask, M.Band) else M.Band(None, None, 1)     # `full`: the unbounded band
        none = torch.zeros(0, dtype=torch.long)
        rows = _split(*_band_ranges(band, n_q, n_k, bm, bn, "rows"), none, split)
        cols = _split(*_band_ranges(band, n_q, n_k, bm, bn, "cols"), none, split)
        return TilePlan(bm, bn, n_q, n_k, True, rows, cols)
    cls = tile_classes(mask, n_q, n_k, bm, bn, runtime)
    rows = _split(*_csr(cls), split)
    cols = _split(*_csr(cls.t().contiguous()), split)
    return TilePlan(bm, bn, n_q, n_k, False, rows, cols)


@functools.lru_cache(maxsize=128)
def _cached(mask, n_q, n_k, bm, bn, split, device) -> TilePlan:
    plan = _build(mask, n_q, n_k, bm, bn, split, None)
    return TilePlan(bm, bn, n_q, n_k, plan.band, plan.rows.to(device), plan.cols.to(device))


def make_plan(mask: M.Mask, n_q: int, n_k: int, block_m: int, block_n: int, split: int | None = None,
              runtime: dict | None = None, device="cpu") -> TilePlan:
    """The schedule of `mask` at `n_q x n_k` with `block_m x block_n` tiles; `split` caps the tiles one program
    walks (None: twice the mean nonempty row, at least 8). Cached unless the mask reads runtime ids."""
    if M.runtime_inputs(mask):
        plan = _build(mask, n_q, n_k, block_m, block_n, split, runtime)
        return TilePlan(block_m, block_n, n_q, n_k, plan.band, plan.rows.to(device), plan.cols.to(device))
    return _cached(mask, n_q, n_k, block_m, block_n, split, torch.device(device))


# ---------------------------------------------------------------------------------------------- aux
def build_aux(mask: M.Mask, n_q: int, n_k: int, batch: int, runtime: dict | None, device) -> torch.Tensor:
    """The int32 AUX buffer the generated `mask_tile` reads (layout in `codegen.data_leaves`)."""
    leaves = data_leaves(mask)
    if not M.runtime_inputs(mask):   # no leaves, or leaves fixed by the shapes: built once
        return _static_aux(mask if leaves else M.FULL, n_q if leaves else 0, n_k if leaves else 0,
                           torch.device(device))
    return _aux(leaves, n_q, n_k, batch, runtime, device)


@functools.lru_cache(maxsize=128)
def _static_aux(mask, n_q, n_k, device):
    leaves = data_leaves(mask)
    return _aux(leaves, n_q, n_k, 0, None, device) if leaves else torch.zeros(1, dtype=torch.int32, device=device)


def _aux(leaves, n_q, n_k, batch, runtime, device) -> torch.Tensor:
    slots = header_slots(leaves)
    n_hdr = slots[-1] + (2 if isinstance(leaves[-1], M.Same) else 1)
    parts, offsets = [], []
    pos = n_hdr
    for leaf in leaves:
        if isinstance(leaf, (M.Rows, M.Cols)):
            n = n_q if isinstance(leaf, M.Rows) else n_k
            idx = torch.tensor(sorted(x for x in leaf.idx if x < n), dtype=torch.long)
            data = [torch.zeros(n, dtype=torch.int32).index_fill_(0, idx, 1)]
        elif isinstance(leaf, M.Random):
            chosen = M.random_blocks(leaf.count, leaf.block, leaf.seed, n_q, n_k)
            table = torch.full((chosen.shape[0], leaf.count), -1, dtype=torch.int32)
            table[:, :chosen.shape[1]] = chosen.to(torch.int32)
            data = [table.flatten()]
        else:
            q_ids, k_ids = runtime_ids(leaf.name, runtime, batch, n_q, n_k)
            both = torch.cat([q_ids.reshape(-1), k_ids.reshape(-1)]).to(device)
            dense = torch.unique(both, return_inverse=True)[1].to(torch.int32)
            data = [dense[:q_ids.numel()], dense[q_ids.numel():]]
        for d in data:
            offsets.append(pos)
            parts.append(d.to(device))
            pos += d.numel()
    head = torch.tensor(offsets, dtype=torch.int32, device=device)
    return torch.cat([head] + parts).contiguous()
