"""Reference linear attention (FAVOR+, relu, elu1), bidirectional and causal: the definition, row by row
(docs/language.md §5.2).

For query t and the unpadded keys j it may see (every key; when causal, j <= t):
`out_t = sum_j (phi(q_t) . phi_t(k_j)) v_j / sum_j (phi(q_t) . phi_t(k_j))` (`features.py` defines phi).
For relu and elu1, `phi_t(k_j) = phi(k_j)`. For FAVOR+ the key stabiliser is one max of `u = x' W^T` over the
keys row t sees: all unpadded keys when bidirectional, the running max `r_t = max_{j <= t, f} u_jf` when causal
(so no row reads the future; the last row equals the bidirectional output). Bidirectional rows are one dense
`[N_q, N_k]` product; causal rows are computed one at a time from the keys they see, O(N^2 (m + D)) work: the
naive twin of the torch backend's chunked scan (`backends/torch/linear_scan.py`).

Nothing an output must not depend on reaches it: padded keys are replaced by zeros before any product, and
a causal row's computation never holds a later key, so a NaN or Inf there changes neither the row nor any
gradient through it. A row with no unpadded key outputs zeros. fp16/bf16 inputs are computed in float32.
"""
from __future__ import annotations

import torch

from ...ir.program import Favor, ReluFeatures
from .features import elu1_features, favor_features, relu_features

_LOW = (torch.float16, torch.bfloat16)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map, projection: torch.Tensor | None,
                     causal: bool = False, key_padding_mask: torch.Tensor | None = None,
                     q_offset: int = 0) -> torch.Tensor:
    """Linear attention. q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]`, projection `[m, D]`
    (None for elu1), `key_padding_mask` bool `[B, N_k]` (True = ignored key). Returns `[B, H, N_q, D_v]` in
    q's dtype. Causal: query row r, at position t = q_offset + r, sees keys j <= t (keys past the last query
    are cut, missing ones are padding).
    """
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    w = projection.to(work) if projection is not None else None
    valid = valid_keys(k, key_padding_mask)
    if causal:
        k, v, valid = align_keys(q_offset + q.shape[2], k, v, valid)
    k, v = (torch.where(valid[:, None, :, None], x, 0.0) for x in (k, v))
    fq = query_features(q, feature_map, w)
    if not causal:
        return _rows(fq, k, v, valid, feature_map, w).to(dtype)
    ends = [q_offset + r + 1 for r in range(q.shape[2])]
    rows = [_rows(fq[:, :, r:r + 1], k[:, :, :t], v[:, :, :t], valid[:, :t], feature_map, w)
            for r, t in enumerate(ends)]
    return (torch.cat(rows, 2) if rows else q.new_zeros(*q.shape[:3], v.shape[3])).to(dtype)


def _rows(fq, k, v, valid, fm, w) -> torch.Tensor:
    """Rows with query features `fq` over the keys `k`, `v` (all of which they see, but the padded ones)."""
    a = torch.matmul(fq, key_features(k, fm, w, valid).transpose(-1, -2))      # [B, H, n_q, n_k]
    a = torch.where(valid[:, None, None, :], a, 0.0)
    return ratio(torch.matmul(a, v), a.sum(-1))


def query_features(q, fm, w) -> torch.Tensor:
    if isinstance(fm, Favor):
        return favor_features(q, w, True, fm.eps)
    return relu_features(q, w) if isinstance(fm, ReluFeatures) else elu1_features(q)


def key_features(k, fm, w, valid) -> torch.Tensor:
    """Key features, zero on padded keys; FAVOR+'s stabiliser is the max over these unpadded keys."""
    if isinstance(fm, Favor):
        return favor_features(k, w, False, fm.eps, valid=valid)
    phi = relu_features(k, w) if isinstance(fm, ReluFeatures) else elu1_features(k)
    return torch.where(valid[:, None, :, None], phi, 0.0)


def valid_keys(k: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """bool `[B, N_k]`: the keys that count."""
    if key_padding_mask is None:
        return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    return ~key_padding_mask.to(k.device)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den == 0 (no key), NaN-free in value and gradient."""
    empty = den == 0
    return torch.where(empty[..., None], torch.zeros_like(num), num / torch.where(empty, 1, den)[..., None])


def align_keys(n_q: int, k, v, valid):
    """Causal keys beyond the last query are never seen: cut them; pad missing ones as padding."""
    n_k = k.shape[2]
    if n_k >= n_q:
        return k[:, :, :n_q], v[:, :, :n_q], valid[:, :n_q]
    pad = n_q - n_k
    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    return k, v, torch.nn.functional.pad(valid, (0, pad), value=False)
