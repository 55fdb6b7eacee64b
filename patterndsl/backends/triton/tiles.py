"""Tile schedules for the block-sparse kernels: which tiles each program walks, split so no program walks long.

A `WorkList` is what one kernel launch iterates: row `w` of `work` (int32 `[W, 4]`) is one program's
`(block, start, end, slot)`. For bands and `full` (`band=True`) `start:end` is a range of *other-side block
indices*, computed by interval arithmetic (no tile table; only with no query offset); otherwise it is a range
into `tiles`, the CSR list of nonempty tiles of the sparse `tile_layout`, each coded `other_block * 2 +
is_full`. The work items come from the schedule helper shared with the torch backend (`plan/schedule.py`): a
block whose list is longer than `split` tiles (global rows, or global columns in the backward) is cut into
pieces that run in parallel; each piece writes into partial slot `slot` (-1: the block is not split, write the
result directly), and `groups[g]` lists the slots of the g-th split block `group_block[g]`, merged by
log-sum-exp (forward) or summed (gradients).

>>> from patterndsl.ir.mask import CAUSAL
>>> plan = make_tile_plan(CAUSAL, 64, 64, 16, 16, split=2)
>>> sorted(plan.rows.work.tolist())   # query block 3 walks key blocks 0..3 in two pieces, slots 1 and 2
[[0, 0, 1, -1], [1, 0, 2, -1], [2, 0, 2, 0], [2, 2, 3, 3], [3, 0, 2, 1], [3, 2, 4, 2]]
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ...ir import mask as M
from ...plan.layout import FULL, band_bounds, tile_layout
from ...plan.schedule import WorkItems, tile_classes, work_items
from ...plan.tiles import TileLayout
from .codegen import emission, is_band


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

    def to(self, device) -> "TilePlan":
        return TilePlan(self.block_m, self.block_n, self.n_q, self.n_k, self.band, self.rows.to(device),
                        self.cols.to(device))

    def describe(self) -> str:
        mode = "band bounds" if self.band else f"tile list ({self.rows.tiles.numel()} tiles)"
        return (f"TilePlan {self.n_q}x{self.n_k} tiles {self.block_m}x{self.block_n}, {mode}: "
                f"{self.rows.work.shape[0]} row programs (longest {self.rows.longest} tiles, "
                f"{self.rows.group_block.numel()} split), {self.cols.work.shape[0]} column programs "
                f"(longest {self.cols.longest}, {self.cols.group_block.numel()} split)")


# ------------------------------------------------------------------------------------------ lists
def _work_list(items: WorkItems, tiles: torch.Tensor) -> WorkList:
    work = torch.stack([items.block, items.start, items.end, items.slot], 1)
    return WorkList(work.to(torch.int32).contiguous(), tiles.to(torch.int32).contiguous(), items.slots,
                    items.groups, items.group_blocks, items.longest)


def _band_lists(mask, n_q, n_k, bm, bn, split) -> tuple[WorkList, WorkList]:
    """Arithmetic loop bounds of a band (or `full`, the unbounded band): no tile table."""
    band = mask if isinstance(mask, M.Band) else M.Band(None, None, 1)
    none = torch.zeros(0, dtype=torch.long)
    lists = []
    for by in ("rows", "cols"):
        first, last = band_bounds(band, n_q, n_k, bm, bn, by)
        lists.append(_work_list(work_items(first, last + 1, split), none))
    return lists[0], lists[1]


def _layout_lists(layout: TileLayout):
    """(row_ptr, tiles) of the sparse layout and of its transpose (the backward's dk, dv walk key blocks),
    each tile coded `other_block * 2 + is_full`, the ragged last key tile partial."""
    kernel = dataclasses.replace(layout, cls=tile_classes(layout))
    return [(lay.row_ptr, lay.col_idx * 2 + (lay.cls == FULL).long()) for lay in (kernel, kernel.transpose())]


def _build(mask, n_q, n_k, bm, bn, split, runtime, q_offset) -> TilePlan:
    if is_band(mask) and q_offset == 0:     # tile_full reads rows, not positions: bands with an offset use lists
        rows, cols = _band_lists(mask, n_q, n_k, bm, bn, split)
        return TilePlan(bm, bn, n_q, n_k, True, rows, cols)
    layout = tile_layout(mask, n_q, n_k, bm, bn, runtime, q_offset)
    out = []
    for row_ptr, tiles in _layout_lists(layout):
        out.append(_work_list(work_items(row_ptr[:-1], row_ptr[1:], split), tiles))
    return TilePlan(bm, bn, n_q, n_k, False, out[0], out[1])


@functools.lru_cache(maxsize=128)
def _cached(mask, n_q, n_k, bm, bn, split, device, q_offset) -> TilePlan:
    return _build(mask, n_q, n_k, bm, bn, split, None, q_offset).to(device)


def make_tile_plan(mask: M.Mask, n_q: int, n_k: int, block_m: int, block_n: int, split: int | None = None,
                   runtime: dict | None = None, device="cpu", q_offset: int = 0) -> TilePlan:
    """The schedule of `mask` at `n_q x n_k` with `block_m x block_n` tiles; `split` caps the tiles one program
    walks (None: twice the mean nonempty row, at least 8); query row r is at position `q_offset + r`. Cached
    unless the mask reads runtime ids."""
    if M.runtime_inputs(mask):
        return _build(mask, n_q, n_k, block_m, block_n, split, runtime, q_offset).to(device)
    return _cached(mask, n_q, n_k, block_m, block_n, split, torch.device(device), q_offset)


# ---------------------------------------------------------------------------------------------- aux
def build_aux(mask: M.Mask, n_q: int, n_k: int, batch: int, runtime: dict | None, device,
              q_offset: int = 0) -> torch.Tensor:
    """The int32 AUX buffer the generated `mask_tile` reads: the query offset, one header entry per part of
    each data leaf (its offset), then the leaves' data (`codegen.emission` lists them)."""
    if not M.runtime_inputs(mask):   # no leaves, or leaves fixed by the shapes: built once
        return _static_aux(mask, n_q, n_k, q_offset, torch.device(device))
    return _aux(mask, n_q, n_k, batch, runtime, q_offset, device)


@functools.lru_cache(maxsize=128)
def _static_aux(mask, n_q, n_k, q_offset, device):
    return _aux(mask, n_q, n_k, 0, None, q_offset, device)


def _aux(mask, n_q, n_k, batch, runtime, q_offset, device) -> torch.Tensor:
    parts = [d for leaf in emission(mask).leaves for d in leaf.data(n_q, n_k, q_offset, batch, runtime)]
    sizes = torch.tensor([0] + [d.numel() for d in parts], dtype=torch.long)
    offsets = 1 + len(parts) + torch.cumsum(sizes, 0)[:-1]
    head = torch.cat([torch.tensor([q_offset]), offsets]).to(torch.int32)
    return torch.cat([head] + [d.to(torch.int32) for d in parts]).to(device).contiguous()
