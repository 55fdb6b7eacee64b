"""Reference softmax attention: the dense math of docs/language.md §5.1, float64-capable and obviously correct.

`out[i] = sum_j softmax_j(scale * q[i].k[j] | M(i, j)) v[j]`; a row with no allowed key outputs zeros and
has log-sum-exp -inf, never NaN (in values and in gradients). When every input is finite this is one dense
product; otherwise each row is computed from the keys it may see only (the others replaced by zeros before
any product), so a NaN or Inf in a masked or padded key reaches no output and no gradient through it.
"""
from __future__ import annotations

import torch

_LOW = (torch.float16, torch.bfloat16)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                      key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention.

    q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]`; `allowed` bool `[N_q, N_k]` or
    `[B, N_q, N_k]` (True = pair interacts); `key_padding_mask` bool `[B, N_k]` (True = ignored key).
    Returns (out `[B, H, N_q, D_v]` in q's dtype, lse `[B, H, N_q]` float32/64). fp16/bf16 inputs are
    computed in float32.
    """
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    ok = allowed if allowed.dim() == 3 else allowed[None]
    ok = ok[:, None]                                               # [B or 1, 1, N_q, N_k]
    if key_padding_mask is not None:
        ok = ok & ~key_padding_mask[:, None, None, :]
    if all(bool(torch.isfinite(x).all()) for x in (q, k, v)):
        out, lse = _rows(q, k, v, ok, scale)
    else:
        rows = [_rows(q[:, :, i:i + 1], *_seen(k, v, ok[:, :, i]), ok[:, :, i:i + 1], scale)
                for i in range(q.shape[2])]
        out = torch.cat([o for o, _ in rows], 2) if rows else q.new_zeros(*q.shape[:3], v.shape[3])
        lse = torch.cat([x for _, x in rows], 2) if rows else q.new_zeros(q.shape[:3])
    return out.to(dtype), lse


def _seen(k, v, ok_row):
    """k, v with the keys one row may not see replaced by zeros (`ok_row` `[B or 1, 1, N_k]`)."""
    keep = ok_row[..., None]
    return torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)


def _rows(q, k, v, ok, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[..., None])                             # exp(-inf) = 0 on masked pairs
    return torch.matmul(p, v), lse
