"""Masks evaluated with torch: the exact bool mask at index tensors, vectorised (no Python loop over pairs).

`mask_at` evaluates a mask at any broadcastable query rows and key indices (tiles, gathered key lists);
`dense_mask` is its cross product of every row and key, the definition every block layout and kernel is
tested against. Both run the masks' one pointwise definition (`Mask.at`) with `TorchMaskOps`. Row r of a
call with `q_offset = o` is at absolute position o + r (keys are at j), so `dense_mask(m, n, q_offset=o)`
is rows o .. o + n - 1 of `dense_mask(m, o + n)`. A mask that reads runtime ids (`same`) gives one answer
per batch row in front: `[B, ...]`.

>>> from patterndsl.ir.mask import sliding, CAUSAL
>>> dense_mask(sliding(1) & CAUSAL, 4).int().tolist()
[[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
>>> dense_mask(CAUSAL, 2, 4, q_offset=2).int().tolist()
[[1, 1, 1, 0], [1, 1, 1, 1]]
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from .mask import Mask
from .predicate import TorchOps


class TorchMaskOps(TorchOps):
    """The mask ops (`ir/masks/base.py`) on integer tensors; data comes from the call's shape and runtime ids.

    `n_q` counts the call's query rows (at absolute positions `q_offset ...`), `n_k` its keys.
    """

    def __init__(self, n_q: int, n_k: int, runtime: dict | None = None, q_offset: int = 0, device=None):
        self.n_q, self.n_k, self.q_offset = n_q, n_k, q_offset
        self.runtime, self.device, self._cache = runtime or {}, device, {}

    def bin(self, op, a, b):
        if op in ("//", "%") and isinstance(b, int) and b and isinstance(a, torch.Tensor):   # the common case
            return torch.div(a, b, rounding_mode="floor") if op == "//" else torch.remainder(a, b)
        return super().bin(op, a, b)

    def logic(self, op, a, b=None):
        for x, y in ((a, b), (b, a)):   # fold a constant side
            if op != "not" and isinstance(x, bool):
                return (y if x else False) if op == "and" else (True if x else y)
        return super().logic(op, a, b)

    def member(self, x, idx: frozenset, side: str):
        key = ("member", idx)
        if key not in self._cache:
            self._cache[key] = torch.tensor(sorted(idx), dtype=torch.long, device=x.device)
        return torch.isin(x, self._cache[key])

    def lookup(self, node, row, value):
        if node not in self._cache:
            self._cache[node] = node.table(self.q_offset + self.n_q, self.n_k).to(row.device)
        table = self._cache[node]
        if table.numel() == 0:
            return torch.zeros((), dtype=torch.bool, device=row.device)
        picks = table[row.clamp(0, table.shape[0] - 1)]                    # [..., width]
        return (picks == value[..., None]).any(-1)

    def ids(self, name: str, side: str, x):
        if name not in self.runtime:
            raise PatternError(f"the mask reads runtime ids '{name}', but none were given",
                               hint=f"pass {name}=<LongTensor [B, N]> when calling the op")
        ids = self.runtime[name]
        q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
        t = (q_ids if side == "q" else k_ids).to(x.device)
        at = x - self.q_offset if side == "q" else x                        # ids are per row of the call
        return t[:, at.clamp(0, t.shape[1] - 1)]                            # [B, *x.shape]


def mask_at(mask: Mask, i: torch.Tensor, j: torch.Tensor, shape: tuple[int, int], runtime: dict | None = None,
            q_offset: int = 0) -> torch.Tensor:
    """Bool tensor of the broadcast shape of query rows `i` and key indices `j` (or `[B, ...]` for runtime ids);
    `shape` = (N_q, N_k) of the call (with `q_offset` it fixes `random`'s draw). Indices outside the shape
    are evaluated as if inside (callers mask them).

    >>> from patterndsl.ir.mask import sliding, cols
    >>> i = torch.tensor([[0], [5]]); j = torch.tensor([[1, 3]])
    >>> mask_at(sliding(2) | cols({3}), i, j, (8, 8)).tolist()
    [[True, True], [False, True]]
    """
    ops = TorchMaskOps(shape[0], shape[1], runtime, q_offset)
    out = mask.at(i + q_offset if q_offset else i, j, ops)
    out = torch.as_tensor(out, dtype=torch.bool, device=i.device)
    full = torch.broadcast_shapes(i.shape, j.shape)
    return out.expand(*out.shape[:out.dim() - len(full)], *full) if out.dim() > len(full) else out.expand(full)


def dense_mask(mask: Mask, n_q: int, n_k: int | None = None, runtime: dict | None = None, device=None,
               q_offset: int = 0) -> torch.Tensor:
    """The bool mask `[n_q, n_k]` (or `[B, n_q, n_k]` if it reads runtime ids), True = pair allowed.

    `runtime` maps `same(...)` names to id tensors `[B, N]` (queries and keys alike) or pairs
    `(q_ids [B, n_q], k_ids [B, n_k])`. Query row r is at position `q_offset + r`.
    """
    n_k = n_q if n_k is None else n_k
    rows = torch.arange(n_q, device=device)
    cols = torch.arange(n_k, device=device)
    return dense_tile(mask, rows, cols, (n_q, n_k), runtime, q_offset)


def dense_tile(mask: Mask, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int],
               runtime: dict | None = None, q_offset: int = 0) -> torch.Tensor:
    """The mask at query rows `rows` x key indices `cols` (1-D index tensors) of an `shape` = (N_q, N_k)
    problem (the whole shape fixes `random`'s draw)."""
    return mask_at(mask, rows[:, None], cols[None, :], shape, runtime, q_offset)
