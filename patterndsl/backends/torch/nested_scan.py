"""Causal Luna (Ma et al. 2021) in torch ops: nested attention through l packed queries, by cumulative sums.

For query t and the unpadded keys j <= t (n_t of them), with head dim d and packed queries p `[l, d]`:

    a[j, l]      = softplus_beta(d^-1/2 c_j . p_l),  beta = ln 2   (softplus_beta(x) = log(1 + exp(beta x)) / beta)
    logits[t, l] = 1/n_t sum_{j <= t} (d^-1/2 q_t . k_j) a[j, l]
    A_t          = softmax_l(logits[t])
    out_t        = 1/n_t sum_{j <= t} (A_t . a_j) v_j

This follows fairseq-apollo's `LunarCausalAttention`: there `pq = pq_proj(P) * d^-1/2` and
`q = q_proj(x) * d^-1/2` are scaled before use, so here the op takes unscaled projections (p = pq_proj(P),
c = pc_proj(x), q, k, v) and applies both d^-1/2 factors itself, as softmax stages apply their scale.
Padded keys get a[j, :] = 0 and are not counted in n_t, so the output equals the output with those keys
removed; a row with no key outputs zeros. The sums are cumulative over j, O(N l d) time and memory (the
reference, `backends/reference/nested.py`, is its naive twin, row by row). Padded keys are replaced by zeros
before the sums. fp16/bf16 inputs are computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import PatternError

BETA = math.log(2.0)
_LOW = (torch.float16, torch.bfloat16)


def nested_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal Luna. q, k, c `[B, H, N, D]`, v `[B, H, N, D_v]`, p `[B, H, l, D]` (packed queries),
    `key_padding_mask` bool `[B, N]` (True = ignored key). Returns `[B, H, N, D_v]` in q's dtype.
    """
    if q.shape[2] != k.shape[2]:
        raise PatternError(f"causal Luna needs as many queries as keys: q has {q.shape[2]}, k has {k.shape[2]}")
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, p, c = (t.to(work) for t in (q, k, v, p, c))
    scale = q.shape[-1] ** -0.5
    if key_padding_mask is not None:
        keep = (~key_padding_mask.to(q.device))[:, None, :, None]
        k, v, c = (torch.where(keep, x, 0.0) for x in (k, v, c))
    a = F.softplus(torch.matmul(c, p.transpose(-1, -2)) * scale, beta=BETA)   # [B, H, N, l]
    if key_padding_mask is not None:
        a = torch.where(keep, a, 0.0)
        count = (~key_padding_mask.to(a.device)).to(work).cumsum(-1)[:, None, :, None]  # [B, 1, N, 1]
    else:
        count = torch.arange(1, q.shape[2] + 1, device=q.device, dtype=work)[:, None]
    inv = torch.where(count > 0, 1 / count.clamp(min=1), torch.zeros_like(count))
    ka = torch.cumsum(k[..., :, None] * a[..., None, :], dim=2)                # [B, H, N, D, l]
    logits = torch.matmul(q[..., None, :] * scale, ka)[..., 0, :] * inv       # [B, H, N, l]
    attn = torch.softmax(logits, dim=-1)
    av = torch.cumsum(a[..., :, None] * v[..., None, :], dim=2)                # [B, H, N, l, Dv]
    out = torch.matmul(attn[..., None, :], av)[..., 0, :] * inv
    return out.to(dtype)
