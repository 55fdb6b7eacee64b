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
from ...plan.layout import FULL
from .codegen import is_band
from .tiles import TilePlan, _csr, _split, make_plan, tile_classes


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
    """`same(...)` query ids placed at absolute positions `[B, extent]` (rows no query of the call holds get an id
    no key has), so the kernels and the layout index them by absolute position."""
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
# INTERIM: the schedule of shifted query rows. Until plan.layout takes q_offset (structure workstream), the
# layout of rows [o, o + n_q) is computed here, and only here: a band shifts exactly (its tiles are walked by
# arithmetic bounds, and the kernels test full tiles at absolute positions); any other mask takes the layout
# of the absolute rows [0, o + n_q) and gives each shifted query block the classes of the (at most two)
# absolute blocks it overlaps: empty if both are, full if both are, else partial. Several offsets take the
# union (nonempty if any is, full only if all are). Replace with the layout's own q_offset when it lands.
# ---------------------------------------------------------------------------------------------------------
def offset_plan(mask: M.Mask, n_q: int, n_k: int, block_m: int, block_n: int, split: int | None,
                offsets: QueryOffsets, runtime: dict | None, device) -> TilePlan:
    """The tile schedule of `mask` for query rows at absolute positions `offsets + [0, n_q)`."""
    if offsets.distinct == (0,):
        return make_plan(mask, n_q, n_k, block_m, block_n, split, runtime, device)
    if is_band(mask):
        lo, hi = (mask.lo, mask.hi) if isinstance(mask, M.Band) else (None, None)
        shifted = M.Band(None if lo is None else lo - max(offsets.distinct),
                         None if hi is None else hi - min(offsets.distinct), 1)
        plan = make_plan(shifted, n_q, n_k, block_m, block_n, split, None, device)
        return TilePlan(block_m, block_n, n_q, n_k, True, plan.rows, plan.cols)
    if not M.runtime_inputs(mask):
        return _cached_list_plan(mask, n_q, n_k, block_m, block_n, split, offsets.distinct, torch.device(device))
    return _list_plan(mask, n_q, n_k, block_m, block_n, split, offsets.distinct, runtime, device)


@functools.lru_cache(maxsize=128)
def _cached_list_plan(mask, n_q, n_k, block_m, block_n, split, distinct, device) -> TilePlan:
    return _list_plan(mask, n_q, n_k, block_m, block_n, split, distinct, None, device)


def _list_plan(mask, n_q, n_k, block_m, block_n, split, distinct, runtime, device) -> TilePlan:
    cls = None
    for o in distinct:
        c = shifted_classes(mask, n_q, n_k, block_m, block_n, o, runtime)
        cls = c if cls is None else torch.where((cls == FULL) & (c == FULL), FULL, torch.maximum(cls, c).clamp(max=1))
    rows = _split(*_csr(cls), split)
    cols = _split(*_csr(cls.t().contiguous()), split)
    return TilePlan(block_m, block_n, n_q, n_k, False, rows.to(device), cols.to(device))


def shifted_classes(mask: M.Mask, n_q: int, n_k: int, block_m: int, block_n: int, offset: int,
                    runtime: dict | None) -> torch.Tensor:
    """int8 `[ceil(n_q / BM), ceil(n_k / BN)]` classes of the query blocks starting at `offset + qb * BM`."""
    absolute = tile_classes(mask, offset + n_q, n_k, block_m, block_n, runtime)
    nqb = -(-n_q // block_m)
    first = offset + torch.arange(nqb) * block_m
    last = torch.minimum(first + block_m, torch.tensor(offset + n_q)) - 1
    a, b = absolute[first // block_m], absolute[last // block_m]
    both_full = (a == FULL) & (b == FULL)
    return torch.where(both_full, FULL, torch.maximum(a, b).clamp(max=1)).to(torch.int8)
