"""Near + far in one softmax (docs/language.md §5.6) in torch ops: exact scores on the near field's gathered
tiles, FAVOR+ estimates on every other key, in O(N (row length + m) d): never N x N.

Features (no eps): `phi(x) = exp(a(x) - c) / sqrt(m)`, `a(x) = x' W^T - |x'|^2 / 2`, `x' = x sqrt(scale)`,
with `c_i = max_f a_f(q_i)` per query and one `c` per (batch, kv head) over its unpadded keys (stabilisers;
the function does not depend on them, so they are detached). The far sums of row i are the totals
`phi(q_i) . sum_j phi(k_j) v_j^T` over all keys (bidirectional) or the keys `j <= i` (causal: a running state
over the keys before the query tile plus the tile's own triangle), minus the same sums over its near keys,
found on the near tiles. Row i is normalised against `M_i = max(max_near s_ij, c_i + c)`: the near weights are
`exp(s_ij - M_i)` and the far sums are scaled by `exp(c_i + c - M_i) <= 1`, so nothing overflows.
"""
from __future__ import annotations

import math

import torch

from .scores import BLOCK, allowed_on, grouped, tiles, ungrouped

_LOW = (torch.float16, torch.bfloat16)


def features(x, w, scale: float):
    """(a(x) `[..., m]`, its max over features `[..., 1]`, detached)."""
    xs = x * math.sqrt(scale)
    a = xs @ w.T - (xs * xs).sum(-1, keepdim=True) / 2
    return a, a.detach().amax(-1, keepdim=True)


def key_features(k, w, scale: float, key_padding_mask):
    """phi(k) `[B, H_kv, N_k, m]` (zeros on padded keys) and the keys' stabiliser c `[B, H_kv, 1, 1]`."""
    a, _ = features(k, w, scale)
    keep = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]
    masked = a.detach() if keep is None else a.detach().masked_fill(~keep, float("-inf"))
    c = masked.amax(dim=(-1, -2), keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    phi = torch.exp(a - c) / math.sqrt(w.shape[0])
    return (phi if keep is None else phi * keep), c


def near_far_attention(stage, q, k, v, w, *, scale, key_padding_mask=None, runtime=None, q_offset=0,
                       block=BLOCK):
    """out `[B, H, N_q, D_v]` of a softmax stage with a far field; `w` the projection `[m, D]`."""
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, w = (x.to(work) for x in (q, k, v, w))
    B, H, n_q, _ = q.shape
    n_k, G, causal = k.shape[2], H // k.shape[1], stage.score.far.causal
    a_q, c_q = features(q, w, scale)
    phi_q = torch.exp(a_q - c_q) / math.sqrt(w.shape[0])                      # [B, H, N_q, m]
    phi_k, c_k = key_features(k, w, scale, key_padding_mask)                  # [B, H_kv, N_k, m]
    kv_all = phi_k.transpose(-1, -2) @ v                                      # [B, H_kv, m, D_v]
    z_all = phi_k.sum(2)                                                      # [B, H_kv, m]
    parts, done = [], 0
    kv_run = torch.zeros_like(kv_all)
    z_run = torch.zeros_like(z_all)
    for rows, cols in tiles(stage.mask, n_q, n_k, runtime, q_offset, block):
        rows, cols = rows.to(q.device), cols.to(q.device)
        pq = grouped(phi_q[:, :, rows], G)                                    # [B, H_kv, G n, m]
        if causal:
            start = min(n_k, q_offset + int(rows[0]))
            if start > done:                                                   # keys before the tile's first row
                kv_run = kv_run + phi_k[:, :, done:start].transpose(-1, -2) @ v[:, :, done:start]
                z_run = z_run + phi_k[:, :, done:start].sum(2)
                done = start
            end = min(n_k, q_offset + int(rows[-1]) + 1)
            tri = (torch.arange(start, end, device=q.device)[None, :] <= rows[:, None] + q_offset)
            a_tri = ungrouped(pq @ phi_k[:, :, start:end].transpose(-1, -2), H) * tri    # [B, H, n, T]
            num = ungrouped(pq @ kv_run, H) + ungrouped(grouped(a_tri, G) @ v[:, :, start:end], H)
            den = ungrouped((pq * z_run[:, :, None]).sum(-1, keepdim=True), H) + a_tri.sum(-1, keepdim=True)
        else:
            num = ungrouped(pq @ kv_all, H)
            den = ungrouped((pq * z_all[:, :, None]).sum(-1, keepdim=True), H)
        far_scale = c_q[:, :, rows] + c_k.repeat_interleave(G, 1)             # log scale of the far sums
        if cols.numel():
            kc, vc = k[:, :, cols], v[:, :, cols]
            s = ungrouped(grouped(q[:, :, rows], G) @ kc.transpose(-1, -2), H) * scale
            ok = allowed_on(stage.mask, rows, cols, (n_q, n_k), runtime, q_offset, key_padding_mask)
            a_near = ungrouped(pq @ phi_k[:, :, cols].transpose(-1, -2), H) * ok
            num = num - ungrouped(grouped(a_near, G) @ vc, H)
            den = den - a_near.sum(-1, keepdim=True)
            s = s.masked_fill(~ok, float("-inf"))
            m = torch.maximum(s.detach().amax(-1, keepdim=True), far_scale)
            p = torch.exp(s - m)
            near_num, near_den = ungrouped(grouped(p, G) @ vc, H), p.sum(-1, keepdim=True)
        else:
            m, near_num, near_den = far_scale, 0.0, 0.0
        f = torch.exp(far_scale - m)
        total = near_den + f * den
        safe = torch.where(total > 0, total, torch.ones_like(total))
        parts.append(torch.where(total > 0, (near_num + f * num) / safe, torch.zeros_like(num)))
    out = torch.cat(parts, 2) if parts else q.new_zeros(B, H, 0, v.shape[3])
    return out.to(dtype)
