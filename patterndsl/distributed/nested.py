"""Causal Luna over sequence-sharded tensors: the cumulative sums start from the segments before.

The function is `backends/torch/nested_scan.py`'s (docs in `backends/reference/nested.py`): with
`a[j] = softplus_beta(d^-1/2 c_j . p)` (zero on padded keys), row t reads three running sums over its
keys j <= t, `KA = sum_j k_j a_j^T` `[D, l]`, `AV = sum_j a_j v_j^T` `[l, D_v]` and the count `n_t`. Each
segment's totals (the backend's `LunaState`, per query head) are all-gathered; a segment runs the backend's
`luna_scan` from the sum of the totals of the segments before it (plain sums: no rescaling). The packed
queries `p` are replicated: each rank's gradient of p is its part, and their sum over ranks is p's gradient.
Grouped-query attention: k, v, c have `H_kv` heads, read by the G query heads of their group, never repeated.
"""
from __future__ import annotations

import torch

from ..backends.torch.nested_scan import LunaState, luna_absorb, luna_scan
from .links import run

_LOW = (torch.float16, torch.bfloat16)


def sharded_nested(comm, sh, q, k, v, p, c, kpm) -> torch.Tensor:
    """This rank's rows of causal Luna; q `[B, H, n, D]`, k, c `[B, H_kv, n, D]`, v `[B, H_kv, n, D_v]`,
    p `[B, H, l, D]`."""
    return run(lambda links, *xs: _nested(links, sh, *xs, kpm), comm, q, k, v, p, c)


def _pack(st: LunaState) -> torch.Tensor:
    """A state as one tensor `[B, Hk, G, D * l + l * Dv + 1]`: ka, av, count."""
    count = st.count.expand(*st.ka.shape[:3], 1, 1)
    return torch.cat([st.ka.flatten(-2), st.av.flatten(-2), count.flatten(-2)], -1)


def _unpack(x: torch.Tensor, D: int, l: int, dv: int) -> LunaState:
    return LunaState(x[..., :D * l].unflatten(-1, (D, l)), x[..., D * l:D * l + l * dv].unflatten(-1, (l, dv)),
                     x[:, :1, :1, -1:, None])


def _nested(links, sh, q, k, v, p, c, kpm):
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v, p, c = (t.to(work) for t in (q, k, v, p, c))
    (B, H, n, D), Hk, l, dv = q.shape, k.shape[1], p.shape[2], v.shape[3]
    valid = torch.ones(B, n, dtype=torch.bool, device=q.device) if kpm is None else ~kpm
    qg, pg = (x.reshape(B, Hk, H // Hk, *x.shape[2:]) for x in (q, p))
    kg, vg, cg = k[:, :, None], v[:, :, None], c[:, :, None]
    rank, segs = links.comm.rank, sh.segments
    bounds = [(s, b, slice(o, o + b - s)) for (s, b), o in zip(segs[rank], sh.offsets(rank))]
    mine = [_pack(luna_absorb(None, kg[..., t, :], vg[..., t, :], pg, cg[..., t, :], valid[:, t]))
            for _, _, t in bounds]
    most = max(len(x) for x in segs)
    mine += [torch.zeros_like(mine[0])] * (most - len(mine))
    every = links.gather(torch.stack(mine))                                  # [W, most, B, Hk, G, D*l + l*Dv + 1]
    outs = []
    for s, b, t in bounds:
        before = [every[r, x] for r in range(sh.world_size) for x, (s2, b2) in enumerate(segs[r]) if b2 > s2 and s2 < s]
        prior = _unpack(torch.stack(before).sum(0), D, l, dv) if before else None
        outs.append(luna_scan(qg[..., t, :], kg[..., t, :], vg[..., t, :], pg, cg[..., t, :], valid[:, t], prior)[0])
    out = torch.cat(outs, -2) if outs else v.new_zeros(*qg.shape[:3], 0, dv)
    return out.reshape(B, H, n, dv).to(dtype)
