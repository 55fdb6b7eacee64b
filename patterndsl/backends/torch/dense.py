"""Dense softmax attention through torch's SDPA: the mask materialised once per shape (cached), or `is_causal`.

For short sequences and dense-ish masks one fused SDPA call over the whole `[N_q, N_k]` score matrix beats
any tiling. The mask is built once per (mask, lengths, dtype, device) as SDPA's additive float mask (0 /
-inf), never per call, so a call costs what SDPA costs. A key padding mask or runtime ids add a per-call
`[B, 1, N_q, N_k]` mask. On the CPU, SDPA runs the fused flash kernel, whose rows with no allowed key come
out 0 (and its backward gives them zero gradients); elsewhere the lowering applies only when every row has
a key. An exactly causal mask needs no mask at all: SDPA's `is_causal` (top-left, like `j <= i`).

>>> import torch
>>> from patterndsl.ir.mask import sliding
>>> q = k = v = torch.randn(1, 2, 16, 8)
>>> dense_attention(q, k, v, sliding(2), 0.35).shape
torch.Size([1, 2, 16, 8])
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...ir import mask as M
from ...ir.dense import dense_mask
from .flash import additive

MAX_DENSE = 1 << 27      # score elements of one dense mask (512 MB of fp32): larger never pays


@functools.lru_cache(maxsize=16)
def _allowed(mask: M.Mask, n_q: int, n_k: int, q_offset: int = 0) -> torch.Tensor:
    return dense_mask(mask, n_q, n_k, q_offset=q_offset)


@functools.lru_cache(maxsize=16)
def static_mask(mask: M.Mask, n_q: int, n_k: int, dtype: torch.dtype, device: torch.device,
                q_offset: int = 0) -> torch.Tensor:
    """SDPA's additive `[N_q, N_k]` mask of `mask` with query row r at position `q_offset + r` (cached)."""
    return additive(_allowed(mask, n_q, n_k, q_offset).to(device), dtype)


def every_row_has_a_key(mask: M.Mask, n_q: int, n_k: int, q_offset: int = 0) -> bool:
    return bool(_allowed(mask, n_q, n_k, q_offset).any(1).all())


def _mask_for(mask, q, k, key_padding_mask, runtime, q_offset: int = 0):
    n_q, n_k = q.shape[2], k.shape[2]
    if runtime:                                   # ids of same(...): only masks that read them get any
        ok = dense_mask(mask, n_q, n_k, runtime, device=q.device, q_offset=q_offset)   # [B, n_q, n_k]
        ok = ok[:, None] if ok.dim() == 3 else ok
        if key_padding_mask is not None:
            ok = ok & ~key_padding_mask[:, None, None, :]
        return additive(ok, q.dtype)
    base = None if mask == M.FULL else static_mask(mask, n_q, n_k, q.dtype, q.device, q_offset)
    if key_padding_mask is None:
        return base
    pad = additive(~key_padding_mask[:, None, None, :], q.dtype)                 # [B, 1, 1, n_k]
    return pad if base is None else base + pad


def dense_attention(q, k, v, mask: M.Mask, scale: float, key_padding_mask=None, runtime=None, q_offset: int = 0):
    """SDPA over `mask` (and padding): q `[B, H, N_q, D]`, k, v `[B, H_kv, N_k, D(_v)]` (grouped heads read
    natively) -> `[B, H, N_q, D_v]`; query row r at position `q_offset + r`."""
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        tied = (q.sum() + k.sum() + v.sum()) * 0
        return q.new_zeros(*q.shape[:3], v.shape[3]) + tied
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask_for(mask, q, k, key_padding_mask, runtime,
                                                                       q_offset),
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def causal_attention(q, k, v, scale: float):
    """SDPA with `is_causal` (key j seen by row i when j <= i)."""
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        tied = (q.sum() + k.sum() + v.sum()) * 0
        return q.new_zeros(*q.shape[:3], v.shape[3]) + tied
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
