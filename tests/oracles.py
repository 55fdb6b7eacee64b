"""Independent definitions of what the op computes, in plain torch (docs/language.md §5, DESIGN.md §3).

Nothing here imports patterndsl's op or backends: the tests that use these oracles would otherwise share the
op's code (the default scale, head slicing and concatenation, padding routing, GQA mapping) with what they
check, and a bug there would be invisible. Masks come in as dense bool tensors (`op.mask(...)`, itself tested
against brute force). Every oracle is O(N^2) and meant for small sizes in float64.

Shapes: q `[B, H, N_q, D]`, k `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv divides H: head h reads kv
head h // (H / H_kv)), key_padding_mask `[B, N_k]` bool (True = ignored key), allowed `[N_q, N_k]` bool.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """k or v `[B, H_kv, N, D]` repeated so query head h sees kv head h // (heads / H_kv)."""
    if x is None or x.shape[1] == heads:
        return x
    assert heads % x.shape[1] == 0, (heads, x.shape)
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def keep(allowed: torch.Tensor, key_padding_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """`[B, 1, N_q, N_k]` bool: pair allowed by the mask and key not padded."""
    ok = allowed.bool().reshape(1, 1, *allowed.shape[-2:]).expand(batch, 1, -1, -1)
    if key_padding_mask is not None:
        ok = ok & ~key_padding_mask.bool()[:, None, None, :]
    return ok


def softmax_attention(q, k, v, allowed, scale=None, key_padding_mask=None, return_lse=False):
    """`out_r = sum_{j in A(r)} exp(s_rj) v_j / sum_{j in A(r)} exp(s_rj)`, `s = scale q.k`, scale defaulting
    to `1/sqrt(d)`; a row with no allowed key outputs zeros (its lse is -inf)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    ok = keep(allowed, key_padding_mask, q.shape[0])
    s = scale * (q @ k.transpose(-1, -2))
    top = s.masked_fill(~ok, -math.inf).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    e = torch.exp((s - top).masked_fill(~ok, -math.inf))
    den = e.sum(-1, keepdim=True)
    out = (e @ v) / torch.where(den > 0, den, torch.ones_like(den))
    if not return_lse:
        return out
    lse = torch.where(den > 0, torch.log(torch.where(den > 0, den, torch.ones_like(den))) + top,
                      torch.full_like(den, -math.inf))
    return out, lse[..., 0]


# ------------------------------------------------------------------------------------------- feature maps
def favor_parts(x, w):
    """(exponent `a = u - |x'|^2 / 2`, projections `u = x' W^T`) of FAVOR+, `x' = x d^-1/4`."""
    xs = x * x.shape[-1] ** -0.25
    u = xs @ w.transpose(-1, -2)
    return u - (xs * xs).sum(-1, keepdim=True) / 2, u


def relu_features(x, w):
    """`relu(x' W^T) + 0.001`, `x' = x d^-1/4`."""
    return torch.relu((x * x.shape[-1] ** -0.25) @ w.transpose(-1, -2)) + 1e-3


def elu1_features(x, w=None):
    """`elu(x) + 1`, elementwise."""
    return F.elu(x) + 1


def _linear_sum(weights, v, ok):
    """`sum_j w_rj v_j / sum_j w_rj` over the kept pairs; zeros where the denominator is 0."""
    weights = weights * ok
    den = weights.sum(-1, keepdim=True)
    return (weights @ v) / torch.where(den != 0, den, torch.ones_like(den))


def linear_attention(q, k, v, allowed, feature_map, w=None, eps=1e-4, key_padding_mask=None):
    """`out_r = sum_{j in A(r)} (phi_Q(q_r).phi_K(k_j)) v_j / sum_{j in A(r)} (...)` with `A(r)` the kept keys of
    row r (`allowed`: full, or causal at absolute positions). `feature_map` is "favor", "relu" or "elu1"; for
    FAVOR+ the query stabiliser is the row's largest projection and the key stabiliser of row r the largest
    projection over its kept keys (one max for `full`, a running max for `causal`)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    ok = keep(allowed, key_padding_mask, q.shape[0]).to(q.dtype)       # [B, 1, Nq, Nk]
    if feature_map == "favor":
        m = w.shape[0]
        aq, uq = favor_parts(q, w)
        pq = (torch.exp(aq - uq.amax(-1, keepdim=True)) + eps) * m ** -0.5                # [B, H, Nq, m]
        ak, uk = favor_parts(k, w)
        key_max = uk.amax(-1)[:, :, None, :].masked_fill(ok == 0, -math.inf)             # [B, H, Nq, Nk]
        c = key_max.amax(-1)                                                             # [B, H, Nq]
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        pk = (torch.exp(ak[:, :, None] - c[..., None, None]) + eps) * m ** -0.5           # [B, H, Nq, Nk, m]
        weights = (pq[:, :, :, None, :] * pk).sum(-1)
    else:
        phi = relu_features if feature_map == "relu" else elu1_features
        weights = phi(q, w) @ phi(k, w).transpose(-1, -2)
    return _linear_sum(weights, v, ok)


# ------------------------------------------------------------------------------------------------- Luna
def luna(q, k, v, p, key_padding_mask=None, pack_scale=None, unpack_scale=None):
    """Bidirectional Luna as two softmax stages: `packed = softmax(p k^T s1) v` over the unpadded keys,
    `out = softmax(q packed^T s2) packed` (keys and values the packed rows). Returns (out, packed)."""
    B, H = q.shape[:2]
    pq = p.expand(B, H, *p.shape[-2:]) if p.dim() >= 3 else p.expand(B, H, *p.shape)
    packed = softmax_attention(pq, k, v, torch.ones(pq.shape[2], k.shape[2], dtype=torch.bool), pack_scale,
                               key_padding_mask)
    out = softmax_attention(q, packed, packed, torch.ones(q.shape[2], pq.shape[2], dtype=torch.bool),
                            unpack_scale)
    return out, packed


def luna_causal(q, k, v, p, c, q_offset=0, key_padding_mask=None):
    """Causal Luna (docs/language.md §5.3): `a_jl = softplus_beta(d^-1/2 c_j.p_l)`, `beta = ln 2`;
    `logits_tl = 1/n_t sum_{j<=t} (d^-1/2 q_t.k_j) a_jl`; `A_t = softmax_l`; `out_t = 1/n_t sum_{j<=t}
    (A_t.a_j) v_j`, over unpadded keys, row r at position t = q_offset + r; rows with n_t = 0 give zeros."""
    B, H, nq, d = q.shape
    k, v, c = (repeat_kv(x, H) for x in (k, v, c))
    pq = p.expand(B, H, *p.shape[-2:]) if p.dim() >= 3 else p.expand(B, H, *p.shape)
    a = F.softplus(d ** -0.5 * (c @ pq.transpose(-1, -2)), beta=math.log(2))                  # [B, H, Nk, L]
    pos = torch.arange(nq)[:, None] + q_offset
    allowed = torch.arange(k.shape[2])[None, :] <= pos
    ok = keep(allowed, key_padding_mask, B).to(q.dtype)                                     # [B, 1, Nq, Nk]
    n = ok.sum(-1, keepdim=True)                                                            # [B, 1, Nq, 1]
    n = torch.where(n > 0, n, torch.ones_like(n))
    s = d ** -0.5 * (q @ k.transpose(-1, -2)) * ok                                          # [B, H, Nq, Nk]
    attn = torch.softmax((s @ a) / n, dim=-1)                                               # [B, H, Nq, L]
    weights = (attn @ a.transpose(-1, -2)) * ok                                             # [B, H, Nq, Nk]
    return (weights @ v) / n
