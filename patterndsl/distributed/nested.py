"""Causal Luna over sequence-sharded tensors: the cumulative sums start from the segments before.

The function is `backends/torch/nested_scan.py`'s (docs in `backends/reference/nested.py`): with
`a[j] = softplus_beta(d^-1/2 c_j . p)` (zero on padded keys), row t reads three running sums over its
keys j <= t, `KA = sum_j k_j a_j^T` `[D, l]`, `AV = sum_j a_j v_j^T` `[l, D_v]` and the count `n_t`. Each
segment's totals are all-gathered; a segment starts its cumulative sums from the totals of the segments
before it (plain sums: no rescaling). The packed queries `p` are replicated: each rank's gradient of p is
its part, and their sum over ranks is p's gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends.torch.nested_scan import BETA
from .links import run

_LOW = (torch.float16, torch.bfloat16)


def sharded_nested(comm, sh, q, k, v, p, c, kpm) -> torch.Tensor:
    """This rank's rows of causal Luna; q, k, c `[B, H, n, D]`, v `[B, H, n, D_v]`, p `[B, H, l, D]`."""
    return run(lambda links, *xs: _nested(links, sh, *xs, kpm), comm, q, k, v, p, c)


def _nested(links, sh, q, k, v, p, c, kpm):
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, p, c = (t.to(work) for t in (q, k, v, p, c))
    B, H, _, D = q.shape
    l, dv = p.shape[2], v.shape[3]
    scale = D ** -0.5
    valid = torch.ones(B, q.shape[2], dtype=torch.bool, device=q.device) if kpm is None else ~kpm
    keep = valid[:, None, :, None]
    k, v, c = (torch.where(keep, x, 0.0) for x in (k, v, c))
    a = torch.where(keep, F.softplus(torch.matmul(c, p.transpose(-1, -2)) * scale, beta=BETA), 0.0)   # [B, H, n, l]
    ka = k[..., :, None] * a[..., None, :]                                                         # [B, H, n, D, l]
    av = a[..., :, None] * v[..., None, :]                                                         # [B, H, n, l, Dv]
    count = valid[:, None, :].to(work).expand(B, H, -1)
    rank, segs = links.comm.rank, sh.segments
    bounds = [(s, b, o) for (s, b), o in zip(segs[rank], sh.offsets(rank))]
    mine = [torch.cat([ka[:, :, o:o + b - s].sum(2).flatten(-2), av[:, :, o:o + b - s].sum(2).flatten(-2),
                       count[:, :, o:o + b - s].sum(-1, keepdim=True)], -1) for s, b, o in bounds]
    most = max(len(x) for x in segs)
    mine += [torch.zeros_like(mine[0])] * (most - len(mine))
    every = links.gather(torch.stack(mine))                                  # [W, most, B, H, D*l + l*Dv + 1]
    outs = []
    for s, b, o in bounds:
        before = [every[r, x] for r in range(sh.world_size) for x, (s2, b2) in enumerate(segs[r]) if b2 > s2 and s2 < s]
        prior = (torch.stack(before).sum(0) if before else every.new_zeros(every.shape[2:]))[:, :, None]
        t = slice(o, o + b - s)
        KA = prior[..., :D * l].unflatten(-1, (D, l)) + torch.cumsum(ka[:, :, t], 2)
        AV = prior[..., D * l:D * l + l * dv].unflatten(-1, (l, dv)) + torch.cumsum(av[:, :, t], 2)
        n = prior[:, :, 0, -1:] + torch.cumsum(count[:, :, t], 2)                                 # [B, H, n]
        inv = torch.where(n > 0, 1 / n.clamp(min=1), torch.zeros_like(n))[..., None]
        logits = torch.matmul(q[:, :, t, None, :] * scale, KA)[..., 0, :] * inv                  # [B, H, n, l]
        attn = torch.softmax(logits, dim=-1)
        outs.append(torch.matmul(attn[..., None, :], AV)[..., 0, :] * inv)
    return torch.cat(outs, 2).to(dtype)
