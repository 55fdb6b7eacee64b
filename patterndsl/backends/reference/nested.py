"""Reference causal Luna (Ma et al. 2021): nested attention through l packed queries, the definition row by row.

For query t and the unpadded keys j <= t (n_t of them), with head dim d and packed queries p `[l, d]`:

    a[j, l]      = softplus_beta(d^-1/2 c_j . p_l),  beta = ln 2   (softplus_beta(x) = log(1 + exp(beta x)) / beta)
    logits[t, l] = 1/n_t sum_{j <= t} (d^-1/2 q_t . k_j) a[j, l]
    A_t          = softmax_l(logits[t])
    out_t        = 1/n_t sum_{j <= t} (A_t . a_j) v_j

This follows fairseq-apollo's `LunarCausalAttention`: there `pq = pq_proj(P) * d^-1/2` and
`q = q_proj(x) * d^-1/2` are scaled before use, so here the op takes unscaled projections (p = pq_proj(P),
c = pc_proj(x), q, k, v) and applies both d^-1/2 factors itself, as softmax stages apply their scale.
Padded keys get a[j, :] = 0 and are not counted in n_t, so the output equals the output with those keys
removed; a row with no key outputs zeros. Each row is computed from the keys it sees (O(N^2 l d) work: the
naive twin of the torch backend's cumulative sums, `backends/torch/nested_scan.py`), and padded keys are
replaced by zeros first, so a NaN or Inf in a later or padded key reaches no output and no gradient through
it. fp16/bf16 inputs are computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .linear import align_keys, valid_keys

BETA = math.log(2.0)
_LOW = (torch.float16, torch.bfloat16)


def nested_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, q_offset: int = 0) -> torch.Tensor:
    """Causal Luna. q `[B, H, N_q, D]`, k, c `[B, H, N_k, D]`, v `[B, H, N_k, D_v]`, p `[B, H, l, D]` (packed
    queries), `key_padding_mask` bool `[B, N_k]` (True = ignored key). Query row r is at position
    t = q_offset + r and sees keys j <= t (keys past the last query are cut, missing ones count as padding).
    Returns `[B, H, N_q, D_v]` in q's dtype.
    """
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, p, c = (t.to(work) for t in (q, k, v, p, c))
    valid = valid_keys(k, key_padding_mask)
    k, v, valid = align_keys(q_offset + q.shape[2], k, v, valid)
    c = align_keys(q_offset + q.shape[2], c, c, valid)[0]
    keep = valid[:, None, :, None]
    k, v, c = (torch.where(keep, x, 0.0) for x in (k, v, c))
    rows = [_row(q[:, :, r], k[:, :, :t + 1], v[:, :, :t + 1], p, c[:, :, :t + 1], keep[:, :, :t + 1])
            for r, t in enumerate(range(q_offset, q_offset + q.shape[2]))]
    return (torch.stack(rows, 2) if rows else q.new_zeros(*q.shape[:3], v.shape[3])).to(dtype)


def _row(q_t, k, v, p, c, keep) -> torch.Tensor:
    """out_t `[B, H, D_v]` from query q_t `[B, H, D]` and the keys j <= t."""
    scale = q_t.shape[-1] ** -0.5
    a = torch.where(keep, F.softplus(torch.matmul(c, p.transpose(-1, -2)) * scale, beta=BETA), 0.0)  # [B, H, t, l]
    n = keep.sum(2).to(q_t.dtype)                                                                     # [B, 1, 1]
    inv = torch.where(n > 0, 1 / n.clamp(min=1), torch.zeros_like(n))
    qk = torch.matmul(k, q_t[..., None])[..., 0] * scale                                              # [B, H, t]
    logits = (qk[..., None] * a).sum(2) * inv                                                         # [B, H, l]
    attn = torch.softmax(logits, dim=-1)
    weights = torch.matmul(a, attn[..., None])[..., 0]                                                # [B, H, t]
    return (weights[..., None] * v).sum(2) * inv
