"""Query positions for the Triton kernels: `q_offset` checked and resolved, and the schedule of shifted rows.

Query row `r` of a call with `q_offset = o` sits at absolute position `o + r` (keys at `j`): masks, runtime ids
and the tile walk all use absolute positions. An offset is an int, a 0-dim integer tensor, or an integer tensor
`[B]` (one per batch row). The kernels take one scalar offset, or (per-row offsets that differ) an int32 tensor
they read per batch row. A tensor offset is read on the host (a device-to-host copy when it lives on the GPU):
pass an int to keep a call free of host syncs.

>>> QueryOffsets.of(None, 2, "cpu").extent(10), QueryOffsets.of(5, 2, "cpu").scalar
(10, 5)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...errors import PatternError
from ...ir import mask as M
from ...plan.layout import FULL, tile_layout
from ...plan.schedule import tile_classes, work_items
from .tiles import TilePlan, WorkList, make_tile_plan


@dataclass(frozen=True)
class QueryOffsets:
    """`values`: () for none, (o,) for every row, or one per batch row; `device` where kernels read them."""
    values: tuple[int, ...]
    device: str = "cpu"

    @staticmethod
    def of(q_offset, batch: int, device) -> "QueryOffsets":
        return QueryOffsets(offset_values(q_offset, batch), str(torch.device(device)))

    @property
    def per_row(self) -> bool:
        return len(set(self.values)) > 1

    @property
    def scalar(self) -> int:
        return 0 if not self.values or self.per_row else self.values[0]

    @property
    def distinct(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.values))) or (0,)

    @property
    def base(self) -> int:
        """The smallest offset: the one the softmax kernels' AUX[0] holds."""
        return min(self.values, default=0)

    def relative(self) -> "QueryOffsets":
        """The offsets past `base` (all 0 when one offset serves every row)."""
        return QueryOffsets(tuple(o - self.base for o in self.values), self.device)

    def extent(self, n_q: int) -> int:
        """One past the last absolute query position."""
        return max(self.values, default=0) + n_q

    def tensor(self, dummy: torch.Tensor) -> torch.Tensor:
        """The per-row offsets as int32 on the device (a copy per distinct tuple), else `dummy`."""
        return _device_offsets(self.values, self.device) if self.per_row else dummy


@functools.lru_cache(maxsize=64)
def _device_offsets(values: tuple, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def offset_values(q_offset, batch: int) -> tuple[int, ...]:
    """The checked offsets as host ints: () for None, (o,) for a scalar, `batch` values for a tensor [B]."""
    if q_offset is None:
        return ()
    if isinstance(q_offset, (list, tuple)):
        q_offset = torch.tensor(q_offset) if q_offset else torch.zeros(0, dtype=torch.long)
    if isinstance(q_offset, bool) or not isinstance(q_offset, (int, torch.Tensor)):
        raise PatternError(f"q_offset must be an int or an integer tensor [B], got {type(q_offset).__name__}")
    if isinstance(q_offset, torch.Tensor):
        if q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool or q_offset.dim() > 1 or (
                q_offset.dim() == 1 and q_offset.shape[0] != batch):
            raise PatternError(f"q_offset must be an int or an integer tensor [{batch}], got {q_offset.dtype} "
                               f"{list(q_offset.shape)}")
        values = tuple(int(x) for x in q_offset.reshape(-1).tolist())
    else:
        values = (q_offset,)
    if any(x < 0 or x >= 1 << 31 for x in values):
        raise PatternError(f"q_offset must be >= 0 and < 2**31, got {min(values) if min(values) < 0 else max(values)}")
    return values


def absolute_runtime(mask: M.Mask, runtime: dict, offsets: QueryOffsets, n_q: int) -> dict:
    """`same(...)` query ids placed at rows `offsets + [0, n_q)` of `[B, extent]` (rows no query of the call
    holds get an id no key has), so the kernels index them as they index rows (by row plus offset)."""
    if not offsets.values or offsets.extent(n_q) == n_q:
        return runtime
    out = {}
    for name, (q_ids, k_ids) in runtime.items():
        fill = int(torch.minimum(q_ids.min(), k_ids.min())) - 1 if q_ids.numel() and k_ids.numel() else -1
        full = torch.full((q_ids.shape[0], offsets.extent(n_q)), fill, dtype=q_ids.dtype, device=q_ids.device)
        starts = offsets.values if len(offsets.values) > 1 else offsets.values * q_ids.shape[0]
        for b, o in enumerate(starts):
            full[b, o:o + n_q] = q_ids[b]
        out[name] = (full, k_ids)
    return out


# ---------------------------------------------------------------------------------------------------------
# The schedule. One offset for the whole batch: the layout's own (`make_tile_plan(q_offset=...)`). Rows at
# different offsets: the union of their layouts (a tile nonempty if it is for any offset, full only if it is
# for all), so one work list serves every batch row; the kernels test partial tiles at each row's positions.
# ---------------------------------------------------------------------------------------------------------
def offset_plan(mask: M.Mask, n_q: int, n_k: int, block_m: int, block_n: int, split: int | None,
                offsets: QueryOffsets, runtime: dict | None, device) -> TilePlan:
    """The tile schedule of `mask` for query rows at absolute positions `offsets + [0, n_q)`."""
    if len(offsets.distinct) == 1:
        return make_tile_plan(mask, n_q, n_k, block_m, block_n, split, runtime, device, offsets.distinct[0])
    if not M.runtime_inputs(mask):
        return _cached_union(mask, n_q, n_k, block_m, block_n, split, offsets.distinct, torch.device(device))
    return _union_plan(mask, n_q, n_k, block_m, block_n, split, offsets.distinct, runtime).to(device)


@functools.lru_cache(maxsize=128)
def _cached_union(mask, n_q, n_k, block_m, block_n, split, distinct, device) -> TilePlan:
    return _union_plan(mask, n_q, n_k, block_m, block_n, split, distinct, None).to(device)


def _classes(layout) -> torch.Tensor:
    """The dense int8 grid of a sparse layout's kernel classes (the ragged last key tile partial)."""
    g = layout.grid
    out = torch.zeros(g.nqb, g.nkb, dtype=torch.int8)
    rows = torch.repeat_interleave(torch.arange(g.nqb), layout.row_ptr[1:] - layout.row_ptr[:-1])
    out[rows, layout.col_idx] = tile_classes(layout).to(torch.int8)
    return out


def _lists(cls: torch.Tensor, split):
    nz = cls != 0
    row_ptr = torch.zeros(cls.shape[0] + 1, dtype=torch.long)
    row_ptr[1:] = nz.sum(1).cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)
    codes = cols * 2 + (cls[rows, cols] == FULL).long()
    items = work_items(row_ptr[:-1], row_ptr[1:], split)
    work = torch.stack([items.block, items.start, items.end, items.slot], 1).to(torch.int32).contiguous()
    return WorkList(work, codes.to(torch.int32).contiguous(), items.slots, items.groups, items.group_blocks,
                    items.longest)


def _union_plan(mask, n_q, n_k, block_m, block_n, split, distinct, runtime) -> TilePlan:
    cls = None
    for o in distinct:
        c = _classes(tile_layout(mask, n_q, n_k, block_m, block_n, runtime, o))
        cls = c if cls is None else torch.where((cls == FULL) & (c == FULL), FULL, torch.maximum(cls, c).clamp(max=1))
    cls = cls.to(torch.int8)
    return TilePlan(block_m, block_n, n_q, n_k, False, _lists(cls, split), _lists(cls.t().contiguous(), split))
