"""Dense evaluation of masks: the exact [n_q, n_k] bool matrix, vectorised (no Python loop over pairs).

This is the definition every block layout and kernel is tested against.

>>> from patterndsl.ir.mask import sliding, CAUSAL
>>> dense_mask(sliding(1) & CAUSAL, 4).int().tolist()
[[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from .mask import (Band, Blocks, Cols, Empty, Full, Inter, Mask, Not, Random, Rows, Same, Union, Where,
                   random_blocks)
from .predicate import evaluate


def dense_mask(mask: Mask, n_q: int, n_k: int | None = None, runtime: dict | None = None,
               device=None) -> torch.Tensor:
    """The bool mask `[n_q, n_k]` (or `[B, n_q, n_k]` if it reads runtime ids), True = pair allowed.

    `runtime` maps `same(...)` names to id tensors `[B, N]` (queries and keys alike) or pairs
    `(q_ids [B, n_q], k_ids [B, n_k])`.
    """
    n_k = n_q if n_k is None else n_k
    rows = torch.arange(n_q, device=device)
    cols = torch.arange(n_k, device=device)
    return dense_tile(mask, rows, cols, (n_q, n_k), runtime)


def dense_tile(mask: Mask, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int],
               runtime: dict | None = None) -> torch.Tensor:
    """The mask at query indices `rows` x key indices `cols` (1-D index tensors) of an `shape` = (N_q, N_k)
    problem (the whole shape fixes `random`'s draw)."""
    return _eval(mask, rows[:, None], cols[None, :], runtime or {}, shape)


def _eval(m: Mask, i: torch.Tensor, j: torch.Tensor, runtime: dict, shape) -> torch.Tensor:
    out_shape = (i.shape[0], j.shape[1])
    if isinstance(m, Full):
        return torch.ones(out_shape, dtype=torch.bool, device=i.device)
    if isinstance(m, Empty):
        return torch.zeros(out_shape, dtype=torch.bool, device=i.device)
    if isinstance(m, Band):
        d = i - j
        ok = torch.ones(out_shape, dtype=torch.bool, device=i.device)
        if m.lo is not None:
            ok = ok & (d >= m.lo)
        if m.hi is not None:
            ok = ok & (d <= m.hi)
        if m.step > 1:
            ok = ok & (torch.remainder(d, m.step) == 0)
        return ok
    if isinstance(m, Rows):
        idx = torch.tensor(sorted(m.idx), dtype=i.dtype, device=i.device)
        return torch.isin(i, idx).expand(out_shape)
    if isinstance(m, Cols):
        idx = torch.tensor(sorted(m.idx), dtype=j.dtype, device=j.device)
        return torch.isin(j, idx).expand(out_shape)
    if isinstance(m, Blocks):
        return (i // m.size) == (j // m.size)
    if isinstance(m, Random):
        chosen = random_blocks(m.count, m.block, m.seed, shape[0], shape[1]).to(i.device)
        if chosen.shape[1] == 0:
            return torch.zeros(out_shape, dtype=torch.bool, device=i.device)
        qb = (i // m.block).clamp(max=chosen.shape[0] - 1)          # [n, 1]
        picks = chosen[qb[:, 0]]                                     # [n, count]
        return (picks[:, None, :] == (j // m.block)[0][None, :, None]).any(-1)
    if isinstance(m, Same):
        return _same(m.name, i, j, runtime)
    if isinstance(m, Where):
        out = evaluate(m.pred, i, j)
        out = torch.as_tensor(out, dtype=torch.bool, device=i.device)
        return out.expand(out_shape) if out.shape != out_shape else out
    if isinstance(m, Union):
        return _fold(m.parts, i, j, runtime, shape, torch.logical_or)
    if isinstance(m, Inter):
        return _fold(m.parts, i, j, runtime, shape, torch.logical_and)
    if isinstance(m, Not):
        return ~_eval(m.part, i, j, runtime, shape)
    raise TypeError(f"not a mask: {m!r}")


def _fold(parts, i, j, runtime, shape, op):
    out = _eval(parts[0], i, j, runtime, shape)
    for p in parts[1:]:
        out = op(out, _eval(p, i, j, runtime, shape))
    return out


def _same(name: str, i, j, runtime: dict) -> torch.Tensor:
    if name not in runtime:
        raise PatternError(f"the mask reads runtime ids '{name}', but none were given",
                           hint=f"pass {name}=<LongTensor [B, N]> when calling the op")
    ids = runtime[name]
    q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
    qi = q_ids[:, i[:, 0].to(q_ids.device)]                   # [B, n_q]
    kj = k_ids[:, j[0].to(k_ids.device)]                      # [B, n_k]
    return (qi[:, :, None] == kj[:, None, :]).to(i.device)
