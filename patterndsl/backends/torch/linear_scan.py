"""Linear attention in torch ops (FAVOR+, relu, elu1): two products when bidirectional, a chunked scan when causal.

Computes the reference's function (`backends/reference/linear.py`, its naive twin) in O(N) memory.
Bidirectional: `out = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`. Causal, by prefix sums over chunks of
`chunk` keys: for FAVOR+ the key features at time t are stabilised by the running max `r_t` of the keys seen
so far, `phi_t(k_j) = m^-1/2 (exp(a_j - r_t) + eps)`; the state `S = sum_j exp(a_j - r_ref) v_j^T` is kept at
the stabiliser `r_ref` of the previous chunk's last position and rescaled by `exp(r_ref - r_t) <= 1`; inside a
chunk `exp(a_j - r_t)` is formed as `exp(a_j - r_j) exp(r_j - r_t)`, both factors <= 1, so nothing overflows.

Padded keys are replaced by zeros before any product (a NaN there reaches no output); a NaN in a later key of
the same chunk still reaches earlier rows through the chunk's products. fp16/bf16 inputs are computed in
float32; float32 and float64 stay as they are.
"""
from __future__ import annotations

import torch

from ...ir.program import Favor
from ..reference.features import favor_exponent, favor_features
from ..reference.linear import align_keys, key_features, query_features, ratio, valid_keys

_LOW = (torch.float16, torch.bfloat16)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map, projection: torch.Tensor | None,
                     causal: bool = False, key_padding_mask: torch.Tensor | None = None, *,
                     chunk: int) -> torch.Tensor:
    """Linear attention. q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]`, projection `[m, D]`
    (None for elu1), `key_padding_mask` bool `[B, N_k]` (True = ignored key). Returns `[B, H, N_q, D_v]` in
    q's dtype. Causal: query t sees keys j <= t, by prefix sums over chunks of `chunk` keys.
    """
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    w = projection.to(work) if projection is not None else None
    valid = valid_keys(k, key_padding_mask)
    if causal:
        k, v, valid = align_keys(q.shape[2], k, v, valid)
    k, v = (torch.where(valid[:, None, :, None], x, 0.0) for x in (k, v))
    if causal:
        out = _causal(q, k, v, valid, feature_map, w, chunk)
    else:
        out = _bidirectional(q, k, v, valid, feature_map, w)
    return out.to(dtype)


def _bidirectional(q, k, v, valid, fm, w) -> torch.Tensor:
    fq = query_features(q, fm, w)
    fk = key_features(k, fm, w, valid)
    kv = torch.matmul(fk.transpose(-1, -2), v)                         # [B, H, m, Dv]
    return ratio(torch.matmul(fq, kv), torch.matmul(fq, fk.sum(-2)[..., None])[..., 0])


def _causal_terms(q, k, valid, fm, w):
    """(qf, kf, r, e): key features at time t are `kf_j exp(r_j - r_t) + e` (for unpadded j)."""
    ok = valid[:, None, :, None]
    if not isinstance(fm, Favor):
        r = torch.zeros(k.shape[:3], dtype=k.dtype, device=k.device)
        return query_features(q, fm, w), key_features(k, fm, w, valid), r, 0.0
    m = w.shape[0]
    u, a = favor_exponent(k, w)
    r = u.masked_fill(~ok, float("-inf")).amax(-1).cummax(dim=-1).values     # [B, H, N] running max
    seen = torch.isfinite(r)
    first = torch.where(seen, r, torch.full_like(r, float("inf"))).amin(-1, keepdim=True)
    first = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    r = torch.where(seen, r, first)                  # before the first key: any value <= later r (no effect)
    kf = m ** -0.5 * torch.exp((a - r[..., None]).masked_fill(~ok, float("-inf")))
    return favor_features(q, w, True, fm.eps), kf, r, m ** -0.5 * fm.eps


def _causal(q, k, v, valid, fm, w, chunk: int) -> torch.Tensor:
    """Prefix sums over chunks. Before chunk [s, s + chunk) the state holds the keys j < s:
    S = sum kf_j exp(r_j - r_ref) v_j^T, z = sum kf_j exp(r_j - r_ref) (the decaying part, at r_ref, the
    stabiliser of position s - 1), sv = sum w_j v_j and cnt = sum w_j (the eps part, which does not decay)."""
    qf, kf, r, e = _causal_terms(q, k, valid, fm, w)
    B, H, N, m = kf.shape
    wv = valid[:, None, :, None].to(v.dtype)
    qsum = qf.sum(-1)                                                   # [B, H, N]
    S = v.new_zeros(B, H, m, v.shape[-1])
    z = v.new_zeros(B, H, m)
    sv = v.new_zeros(B, H, v.shape[-1])
    cnt = v.new_zeros(B, 1)
    r_ref = r[..., :1]
    outs = []
    for s in range(0, N, chunk):
        t = slice(s, min(s + chunk, N))
        qc, kc, vc, rc, wc = qf[:, :, t], kf[:, :, t], v[:, :, t], r[:, :, t], wv[:, :, t]
        n = qc.shape[2]
        tri = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        decay = torch.exp((rc[..., None, :] - rc[..., :, None]).masked_fill(~tri, float("-inf")))  # [t, j]
        g = torch.matmul(qc, kc.transpose(-1, -2)) * decay                 # exp part, [B, H, t, j]
        g = g + e * qsum[:, :, t, None] * (wc[..., 0][:, :, None, :] * tri)  # eps part of unpadded j <= t
        back = torch.exp(r_ref - rc)[..., None]                              # rescale the state, <= 1
        num = torch.matmul(g, vc) + back * torch.matmul(qc, S) + e * qsum[:, :, t, None] * sv[:, :, None]
        den = g.sum(-1) + back[..., 0] * torch.matmul(qc, z[..., None])[..., 0] + e * qsum[:, :, t] * cnt[:, :, None]
        outs.append(ratio(num, den))
        r_new = rc[..., -1:]
        ks = kc * torch.exp(rc - r_new)[..., None]
        S = torch.exp(r_ref - r_new)[..., None] * S + torch.matmul(ks.transpose(-1, -2), vc)
        z = torch.exp(r_ref - r_new) * z + ks.sum(-2)
        sv = sv + (vc * wc).sum(-2)
        cnt = cnt + wc[:, 0, :, 0].sum(-1, keepdim=True)
        r_ref = r_new
    return torch.cat(outs, dim=2)
