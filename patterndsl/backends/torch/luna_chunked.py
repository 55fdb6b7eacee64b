"""Causal Luna by chunks: matmuls inside a chunk, two small carried states between chunks (autograd backward).

The function is the reference's (`backends/reference/nested.py`, DESIGN.md §3): with `a = softplus_beta(c
p^T / sqrt(d))` (zero on padded keys), `n_t` the unpadded keys up to t, and q scaled by `1/sqrt(d)`,

    logits_t = (q_t . sum_{j<=t} k_j a_j^T) / n_t        A_t = softmax(logits_t)
    out_t    = (A_t . sum_{j<=t} a_j v_j^T) / n_t

The reference forms the prefix sums `sum k_j a_j^T` (`[N, D, l]`) and `sum a_j v_j^T` (`[N, l, D_v]`) for
every t: memory-bound passes over N*D*l elements and N one-row matmuls. Here the rows are cut into chunks
of `chunk`: inside a chunk the sums over `j <= t` are masked `[c, c]` matmuls, and the earlier chunks enter
through the carried states `KA = sum k_j a_j^T` (`[D, l]`) and `AV = sum a_j v_j^T` (`[l, D_v]`):

    logits_c = (q_c KA + ((q_c k_c^T) * tril) a_c) / n_c      out_c = (A_c AV + ((A_c a_c^T) * tril) v_c) / n_c

which is O(N c (D + l)); the chunk states are exclusive prefix sums over chunks, so every chunk runs in
the same few batched matmuls (no Python loop over chunks).

>>> import torch
>>> q = k = v = c = torch.randn(1, 2, 10, 8); p = torch.randn(1, 2, 4, 8)
>>> luna_chunked_attention(q, k, v, p, c, chunk=4).shape
torch.Size([1, 2, 10, 8])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import PatternError

BETA = math.log(2.0)
_LOW = (torch.float16, torch.bfloat16)


def _before(x):
    """Exclusive prefix sum over chunks (dim 2): chunk i gets the sum of chunks 0 .. i-1."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), torch.cumsum(x[:, :, :-1], 2)], 2)


def luna_chunked_attention(q, k, v, p, c, key_padding_mask=None, chunk: int = 64):
    """Causal Luna: q, k, c `[B, H, N, D]`, v `[B, H, N, D_v]`, p `[B, H, l, D]`, `key_padding_mask` `[B, N]`.
    Returns `[B, H, N, D_v]` in q's dtype (fp16/bf16 computed in float32); differentiable in every input."""
    if q.shape[2] != k.shape[2]:
        raise PatternError(f"causal Luna needs as many queries as keys: q has {q.shape[2]}, k has {k.shape[2]}")
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, p, c = (t.to(work) for t in (q, k, v, p, c))
    B, H, N, D = q.shape
    scale = D ** -0.5
    a = F.softplus(torch.matmul(c, p.transpose(-1, -2)) * scale, beta=BETA)        # [B, H, N, l]
    if key_padding_mask is not None:
        valid = (~key_padding_mask.to(a.device)).to(work)
        a = a * valid[:, None, :, None]
        count = valid.cumsum(-1)[:, None, :, None]                                  # [B, 1, N, 1]
    else:
        count = torch.arange(1, N + 1, device=q.device, dtype=work)[:, None]
    inv = torch.where(count > 0, 1 / count.clamp(min=1), torch.zeros_like(count))
    nc = -(-N // chunk)
    pad = nc * chunk - N
    if pad:                                          # padded keys have a = 0; padded rows are dropped
        q, k, v, a = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, a))
        inv = F.pad(inv, (0, 0, 0, pad))
    blocks = lambda x: x.reshape(*x.shape[:-2], nc, chunk, x.shape[-1])        # noqa: E731
    qc, kc, vc, ac = blocks(q * scale), blocks(k), blocks(v), blocks(a)       # [B, H, nc, c, .]
    ic = inv.reshape(*inv.shape[:-2], nc, chunk, 1)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    ka = torch.matmul(kc.transpose(-1, -2), ac)                               # [B, H, nc, D, l] per chunk
    av = torch.matmul(ac.transpose(-1, -2), vc)                               # [B, H, nc, l, Dv]
    ka_before, av_before = _before(ka), _before(av)                           # the earlier chunks' sums
    s_qk = torch.matmul(qc, kc.transpose(-1, -2)).masked_fill(~tri, 0.0)
    attn = torch.softmax((torch.matmul(qc, ka_before) + torch.matmul(s_qk, ac)) * ic, dim=-1)
    p_aa = torch.matmul(attn, ac.transpose(-1, -2)).masked_fill(~tri, 0.0)
    out = (torch.matmul(attn, av_before) + torch.matmul(p_aa, vc)) * ic
    out = out.reshape(B, H, nc * chunk, -1)[:, :, :N]
    return out.to(dtype)
