"""Reference softmax with score terms (docs/language.md §5.5): the dense definition, float64-capable.

`scored_softmax`: `s = scale * q . k`, the bias, the soft cap, then the mask and the softmax; a row with no
allowed key outputs zeros. `near_far_softmax`: the near field's exact scores and the far field's FAVOR+
estimates in one softmax, each estimate written as its own log (`log E_ij`, a log-sum-exp over the features),
so the definition is one dense softmax over `N x N` weights (the fast backends never form it).
"""
from __future__ import annotations

import math

import torch

from ...ir.scores.ops import TorchScoreOps

_LOW = (torch.float16, torch.bfloat16)


def _positions(q, k, q_offset: int, head_offset: int):
    dev = q.device
    i = torch.arange(q.shape[2], device=dev)[:, None] + q_offset
    j = torch.arange(k.shape[2], device=dev)[None, :]
    h = torch.arange(q.shape[1], device=dev)[:, None, None] + head_offset
    return i, j, h


def _allowed(allowed, key_padding_mask):
    ok = (allowed if allowed.dim() == 3 else allowed[None])[:, None]      # [B or 1, 1, N_q, N_k]
    if key_padding_mask is not None:
        ok = ok & ~key_padding_mask[:, None, None, :]
    return ok


def _softmax_rows(w, ok, v):
    """Softmax of weights `w` over the allowed keys `ok`, times v; rows with no allowed key give zeros."""
    w = w.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(w, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.matmul(torch.exp(w - safe[..., None]), v)


def scored_softmax(q, k, v, allowed, scale: float, score, tables: dict, key_padding_mask=None, q_offset: int = 0,
                   head_offset: int = 0) -> torch.Tensor:
    """Softmax attention with a stage's pointwise score terms. q `[B, H, N_q, D]`, k, v with H heads;
    `allowed` bool `[N_q, N_k]` or `[B, N_q, N_k]`; `tables` the bias tables by name (`[H_all, width]`);
    query row r at position `q_offset + r`, head index `head_offset + h`."""
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    ops = TorchScoreOps(*_positions(q, k, q_offset, head_offset), {n: t.to(work) for n, t in tables.items()}, work)
    s = score.apply(torch.matmul(q, k.transpose(-1, -2)) * scale, ops)
    return _softmax_rows(s, _allowed(allowed, key_padding_mask), v).to(dtype)


def far_log_estimate(q, k, w, scale: float):
    """`log E_ij` `[B, H, N_q, N_k]`: the log of FAVOR+'s estimate of `exp(scale q_i . k_j)` (no eps)."""
    r = math.sqrt(scale)
    qs, ks = q * r, k * r
    uq, uk = qs @ w.T, ks @ w.T                                        # [B, H, N, m]
    pair = torch.logsumexp(uq[..., :, None, :] + uk[..., None, :, :], dim=-1)
    return (pair - (qs * qs).sum(-1)[..., :, None] / 2 - (ks * ks).sum(-1)[..., None, :] / 2
            - math.log(w.shape[0]))


def near_far_softmax(q, k, v, near, base, w, scale: float, key_padding_mask=None) -> torch.Tensor:
    """One softmax over exact scores on `near` and FAVOR+ estimates on `base & ~near` (bool `[N_q, N_k]` or
    `[B, N_q, N_k]`); `w` the projection `[m, D]`."""
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, w = q.to(work), k.to(work), v.to(work), w.to(work)
    near_ok = _allowed(near, key_padding_mask)
    far_ok = _allowed(base, key_padding_mask) & ~near_ok
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = torch.where(near_ok, s, far_log_estimate(q, k, w, scale))
    return _softmax_rows(logits, near_ok | far_ok, v).to(dtype)
