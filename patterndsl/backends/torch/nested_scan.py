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

Grouped-query attention: k, v, c have `H_kv` heads and are read by the G query heads of their group without
being repeated; the sums stay per query head, because `a[j, l]` depends on that head's packed queries. A query
offset o (row r at position o + r, seeing keys j <= o + r) and a decode step both start from a `LunaState`:
the sums over the keys before the call's first row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


BETA = math.log(2.0)
_LOW = (torch.float16, torch.bfloat16)


@dataclass
class LunaState:
    """Sums over the keys seen, per query head: `ka [B, Hk, G, D, l]` (sum k_j a_j^T), `av [B, Hk, G, l, Dv]`
    (sum a_j v_j^T) and `count [B, 1, 1, 1, 1]` (unpadded keys)."""
    ka: torch.Tensor
    av: torch.Tensor
    count: torch.Tensor


def nested_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, c: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, q_offset: int = 0) -> torch.Tensor:
    """Causal Luna. q `[B, H, N_q, D]`, k, c `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv dividing H),
    p `[B, H, l, D]` (packed queries), `key_padding_mask` bool `[B, N_k]` (True = ignored key). Query row r is
    at position t = q_offset + r and sees keys j <= t (keys past the last query are cut, missing ones count as
    padding). Returns `[B, H, N_q, D_v]` in q's dtype.
    """
    from ..reference.linear import align_keys, valid_keys
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, p, c = (t.to(work) for t in (q, k, v, p, c))
    B, H, n_q, _ = q.shape
    valid = valid_keys(k, key_padding_mask)
    o = q_offset
    k, v, kept = align_keys(o + n_q, k, v, valid)
    c = align_keys(o + n_q, c, c, valid)[0]
    qg, pg = (x.reshape(B, k.shape[1], H // k.shape[1], *x.shape[2:]) for x in (q, p))
    kg, vg, cg = k[:, :, None], v[:, :, None], c[:, :, None]
    state = luna_absorb(None, kg[..., :o, :], vg[..., :o, :], pg, cg[..., :o, :], kept[:, :o]) if o else None
    out = luna_scan(qg, kg[..., o:, :], vg[..., o:, :], pg, cg[..., o:, :], kept[:, o:], state)[0]
    return out.reshape(B, H, n_q, v.shape[-1]).to(dtype)


def _weights(k, v, p, c, valid):
    """(k, v zeroed where padded, a `[B, Hk, G, n, l]`, validity `[B, 1, 1, n, 1]`)."""
    keep = valid[:, None, None, :, None]
    k, v, c = (torch.where(keep, x, 0.0) for x in (k, v, c))
    a = F.softplus(torch.matmul(c, p.transpose(-1, -2)) * c.shape[-1] ** -0.5, beta=BETA)
    return k, v, torch.where(keep, a, 0.0), keep.to(k.dtype)


def luna_absorb(state, k, v, p, c, valid) -> LunaState:
    """`state` (None: empty) with keys k, c `[B, Hk, 1, n, D]`, v `[B, Hk, 1, n, Dv]` added (p `[B, Hk, G, l, D]`)."""
    k, v, a, w = _weights(k, v, p, c, valid)
    ka = torch.matmul(k.transpose(-1, -2), a)                  # [B, Hk, G, D, l]
    av = torch.matmul(a.transpose(-1, -2), v)                  # [B, Hk, G, l, Dv]
    count = w.sum(-2, keepdim=True)
    if state is not None:
        ka, av, count = state.ka + ka, state.av + av, state.count + count
    return LunaState(ka, av, count)


def luna_scan(q, k, v, p, c, valid, state: LunaState | None = None):
    """(rows `[B, Hk, G, n, Dv]`, state after the keys): row t sees the keys of `state` and keys 0 .. t here.
    q `[B, Hk, G, n, D]`, k, c `[B, Hk, 1, n, D]`, v `[B, Hk, 1, n, Dv]`, p `[B, Hk, G, l, D]`, valid `[B, n]`."""
    scale = q.shape[-1] ** -0.5
    k, v, a, w = _weights(k, v, p, c, valid)
    count = torch.cumsum(w, dim=-2)                                            # [B, 1, 1, n, 1]
    ka = torch.cumsum(k[..., :, None] * a[..., None, :], dim=-3)              # [B, Hk, G, n, D, l]
    av = torch.cumsum(a[..., :, None] * v[..., None, :], dim=-3)              # [B, Hk, G, n, l, Dv]
    if state is not None:
        ka, av = ka + state.ka[..., None, :, :], av + state.av[..., None, :, :]
        count = count + state.count
    inv = torch.where(count > 0, 1 / count.clamp(min=1), torch.zeros_like(count))
    logits = torch.matmul(q[..., None, :] * scale, ka)[..., 0, :] * inv       # [B, Hk, G, n, l]
    attn = torch.softmax(logits, dim=-1)
    out = torch.matmul(attn[..., None, :], av)[..., 0, :] * inv
    if q.shape[-2] == 0:
        return out, state if state is not None else luna_absorb(None, k, v, p, c, valid)
    return out, LunaState(ka[..., -1, :, :], av[..., -1, :, :], count[..., -1:, :])
