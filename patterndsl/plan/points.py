"""Pointwise mask evaluation: whether each (i, j) of two broadcastable index tensors is allowed.

`dense_mask` evaluates the cross product of a row and a column range; tiles and gathered key lists need the
mask at arbitrary pairs (`i[t, r, 1]` against `j[t, 1, c]`, say), so this evaluator takes any broadcastable
index tensors. It follows `ir/dense.py` case by case (the tests compare the two). A mask that reads runtime ids
(`same`) gives `[B, *shape]`, one answer per batch row.

>>> import torch
>>> from patterndsl.ir.mask import sliding, cols
>>> i = torch.tensor([[0], [5]]); j = torch.tensor([[1, 3]])
>>> mask_at(sliding(2) | cols({3}), i, j, (8, 8)).tolist()
[[True, True], [False, True]]
"""
from __future__ import annotations

import torch

from ..ir import mask as M
from ..ir.predicate import evaluate


def mask_at(mask: M.Mask, i: torch.Tensor, j: torch.Tensor, shape: tuple[int, int],
            runtime: dict | None = None) -> torch.Tensor:
    """Bool tensor of the broadcast shape of `i` and `j` (or `[B, ...]` for runtime ids); `shape` = (N_q, N_k)
    fixes `random`'s draw. Indices outside the shape are evaluated as if inside (callers mask them)."""
    out = _at(mask, i, j, runtime or {}, shape)
    full = torch.broadcast_shapes(i.shape, j.shape)
    return out.expand(*out.shape[:out.dim() - len(full)], *full) if out.dim() >= len(full) else out.expand(full)


def _at(m: M.Mask, i, j, runtime, shape) -> torch.Tensor:
    if isinstance(m, M.Full):
        return torch.ones((), dtype=torch.bool, device=i.device)
    if isinstance(m, M.Empty):
        return torch.zeros((), dtype=torch.bool, device=i.device)
    if isinstance(m, M.Band):
        d = i - j
        ok = torch.ones((), dtype=torch.bool, device=i.device)
        if m.lo is not None:
            ok = ok & (d >= m.lo)
        if m.hi is not None:
            ok = ok & (d <= m.hi)
        if m.step > 1:
            ok = ok & (torch.remainder(d, m.step) == 0)
        return ok
    if isinstance(m, (M.Rows, M.Cols)):
        x = i if isinstance(m, M.Rows) else j
        return torch.isin(x, torch.tensor(sorted(m.idx), dtype=x.dtype, device=x.device))
    if isinstance(m, M.Blocks):
        return torch.div(i, m.size, rounding_mode="floor") == torch.div(j, m.size, rounding_mode="floor")
    if isinstance(m, M.Random):
        chosen = M.random_blocks(m.count, m.block, m.seed, shape[0], shape[1]).to(i.device)
        if chosen.shape[1] == 0:
            return torch.zeros((), dtype=torch.bool, device=i.device)
        picks = chosen[(i // m.block).clamp(0, chosen.shape[0] - 1)]            # [..., count]
        return (picks == (j // m.block)[..., None]).any(-1)
    if isinstance(m, M.Same):
        return _same(m.name, i, j, runtime)
    if isinstance(m, M.Where):
        return torch.as_tensor(evaluate(m.pred, i, j), dtype=torch.bool, device=i.device)
    if isinstance(m, (M.Union, M.Inter)):
        fold = torch.logical_or if isinstance(m, M.Union) else torch.logical_and
        out = _at(m.parts[0], i, j, runtime, shape)
        for p in m.parts[1:]:
            out = fold(_lead(out, i, j), _lead(_at(p, i, j, runtime, shape), i, j))
        return out
    if isinstance(m, M.Not):
        return ~_at(m.part, i, j, runtime, shape)
    raise TypeError(f"not a mask: {m!r}")


def _lead(x: torch.Tensor, i, j) -> torch.Tensor:
    """Broadcast a per-pair answer to the pair shape so that a batch dim (runtime ids) lines up in front."""
    full = torch.broadcast_shapes(i.shape, j.shape)
    return x.expand(full) if x.dim() <= len(full) else x


def _same(name: str, i, j, runtime: dict) -> torch.Tensor:
    from ..ir.dense import dense_mask
    if name not in runtime:
        dense_mask(M.Same(name), 1, 1, runtime)  # raises the user error about missing ids
    ids = runtime[name]
    q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
    q_ids, k_ids = q_ids.to(i.device), k_ids.to(i.device)
    qi = q_ids[:, i.clamp(0, q_ids.shape[1] - 1)]                               # [B, *i.shape]
    kj = k_ids[:, j.clamp(0, k_ids.shape[1] - 1)]                               # [B, *j.shape]
    return qi == kj
