"""Block-sparse softmax attention in torch ops: forward (out, log-sum-exp) and a recomputing backward.

For each chunk of a `Schedule` the key/value tiles of its items are gathered (`[B, H, C, T * bn, D]`), scored
against the items' query tiles by one batched matmul, masked only where the chunk has partial or padding
tiles, and normalised per row. Items that are their query tile's only item are written out directly; the
pieces of split (skewed) rows are merged by log-sum-exp. The backward recomputes the probabilities from the
saved log-sum-exp, as flash attention does: `p = exp(s - lse)`, `ds = p * (dp - rowsum(dout * out))`, and
scatters dk, dv tile by tile with `index_add_`. Nothing larger than a chunk is ever materialised.

Grouped-query attention (k, v with `H_kv` heads, `G = H / H_kv` query heads each): query tile a of the G heads
sharing a kv head is one `[G * bm, D]` tile (`_q_tiles`), scored against that kv head's gathered tiles by the
same matmul, so K/V are never repeated and dk, dv sum over the G heads inside the product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import Schedule

NEG_INF = float("-inf")


def _tiles(x: torch.Tensor, n_tiles: int, block: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, n_tiles, block, D], zero padded at the end."""
    B, H, N, D = x.shape
    return F.pad(x, (0, 0, 0, n_tiles * block - N)).view(B, H, n_tiles, block, D)


def _q_tiles(x: torch.Tensor, g, groups: int) -> torch.Tensor:
    """[B, H, N, ...] -> [B, H_kv, nqb, groups * bm, ...]: query tile a of the heads sharing a kv head, stacked."""
    if groups == 1:
        return _tiles(x, g.nqb, g.bm) if x.dim() == 4 else _tiles(x[..., None], g.nqb, g.bm)[..., 0]
    t = _tiles(x if x.dim() == 4 else x[..., None], g.nqb, g.bm)           # [B, H, nqb, bm, D]
    B, H = t.shape[:2]
    t = t.view(B, H // groups, groups, g.nqb, g.bm, t.shape[-1]).transpose(2, 3)
    t = t.reshape(B, H // groups, g.nqb, groups * g.bm, t.shape[-1])
    return t if x.dim() == 4 else t[..., 0]


def _q_untiled(t: torch.Tensor, g, groups: int) -> torch.Tensor:
    """The inverse of `_q_tiles`, cut to the n_q rows: [B, H_kv, nqb, groups * bm, ...] -> [B, H, n_q, ...]."""
    B, Hk = t.shape[:2]
    rest = t.shape[4:]
    t = t.view(B, Hk, g.nqb, groups, g.bm, *rest).transpose(2, 3)
    return t.reshape(B, Hk * groups, g.nqb * g.bm, *rest)[:, :, :g.n_q]


def _key_valid(key_padding_mask, sched: Schedule) -> torch.Tensor | None:
    """bool [B, nkb + 1, bn]: unpadded keys (the extra tile is the padding tile)."""
    if key_padding_mask is None:
        return None
    g = sched.grid
    valid = F.pad(~key_padding_mask, (0, (g.nkb + 1) * g.bn - g.n_k), value=False)
    return valid.view(valid.shape[0], g.nkb + 1, g.bn)


def _masked_scores(qc, kc, chunk, sched: Schedule, kvalid, groups: int = 1) -> torch.Tensor:
    """Scores `[B, H_kv, C, groups * bm, T * bn]` of a chunk with disallowed pairs at -inf."""
    s = torch.matmul(qc, kc.transpose(-1, -2))
    g = sched.grid
    if chunk.unmasked and kvalid is None:
        return s
    ok = chunk.allowed(g.bm, g.bn)                                 # [C, bm, T*bn] or [B, C, bm, T*bn]
    if groups > 1:                                                 # the same rows for every head of a group
        ok = ok.unsqueeze(-3).expand(*ok.shape[:-2], groups, *ok.shape[-2:]).flatten(-3, -2)
    ok = ok[:, None] if ok.dim() == 4 else ok[None, None]
    if kvalid is not None:
        C, T = chunk.k_tiles.shape
        kv = kvalid[:, chunk.k_tiles].view(kvalid.shape[0], 1, C, 1, T * g.bn)
        ok = ok & kv
    return s.masked_fill_(~ok, NEG_INF)


def _gather(qt, kt, vt, chunk):
    B, H = kt.shape[:2]
    C, T = chunk.k_tiles.shape
    kc = kt[:, :, chunk.k_tiles].view(B, H, C, T * kt.shape[3], kt.shape[4])
    vc = vt[:, :, chunk.k_tiles].view(B, H, C, T * vt.shape[3], vt.shape[4])
    return qt[:, :, chunk.q_tiles], kc, vc


def blocksparse_fwd(q, k, v, sched: Schedule, scale: float, key_padding_mask=None):
    """(out `[B, H, N_q, D_v]`, lse `[B, H, N_q]`) of q `[B, H, N_q, D]`, k, v `[B, H_kv, N_k, D(_v)]`."""
    g = sched.grid
    G = q.shape[1] // k.shape[1]
    B, Hk, Dv, rows = q.shape[0], k.shape[1], v.shape[3], G * g.bm
    qt = _q_tiles(q * scale, g, G)
    kt, vt = _tiles(k, g.nkb + 1, g.bn), _tiles(v, g.nkb + 1, g.bn)
    kvalid = _key_valid(key_padding_mask, sched)
    out = q.new_zeros(B, Hk, g.nqb, rows, Dv)
    lse = q.new_full((B, Hk, g.nqb, rows), NEG_INF)
    part_o = q.new_zeros(B, Hk, sched.slots + 1, rows, Dv)
    part_lse = q.new_full((B, Hk, sched.slots + 1, rows), NEG_INF)
    for chunk in sched.chunks:
        qc, kc, vc = _gather(qt, kt, vt, chunk)
        s = _masked_scores(qc, kc, chunk, sched, kvalid, G)
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill_(m == NEG_INF, 0.0)
        p = s.sub_(m).exp_()
        l = p.sum(-1)
        o = torch.matmul(p, vc).div_(l.masked_fill(l == 0, 1.0)[..., None])
        row_lse = m[..., 0] + torch.log(l)
        if chunk.direct.numel():
            d = chunk.direct
            out.index_copy_(2, chunk.q_tiles[d], o[:, :, d])
            lse.index_copy_(2, chunk.q_tiles[d], row_lse[:, :, d])
        if chunk.split.numel():
            part_o.index_copy_(2, chunk.slots, o[:, :, chunk.split])
            part_lse.index_copy_(2, chunk.slots, row_lse[:, :, chunk.split])
    if sched.group_tiles.numel():
        po, pl = part_o[:, :, sched.groups], part_lse[:, :, sched.groups]     # [B, H, G, P, bm(, Dv)]
        total = torch.logsumexp(pl, dim=3)                                   # [B, H, G, bm]
        w = torch.exp(pl - total.masked_fill(total == NEG_INF, 0.0)[:, :, :, None])
        out.index_copy_(2, sched.group_tiles, (w[..., None] * po).sum(3))
        lse.index_copy_(2, sched.group_tiles, total)
    return _q_untiled(out, g, G), _q_untiled(lse, g, G)


def blocksparse_bwd(dout, q, k, v, out, lse, sched: Schedule, scale: float, key_padding_mask=None, dlse=None):
    """(dq, dk, dv) from the saved output and log-sum-exp (probabilities recomputed chunk by chunk)."""
    g = sched.grid
    G = q.shape[1] // k.shape[1]
    B, Hk, D, Dv = q.shape[0], k.shape[1], q.shape[3], v.shape[3]
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    qt = _q_tiles(q * scale, g, G)
    dot = _q_tiles(dout, g, G)
    lse_t = _q_tiles(lse.masked_fill(lse == NEG_INF, 0.0), g, G)
    delta_t = _q_tiles(delta, g, G)
    kt, vt = _tiles(k, g.nkb + 1, g.bn), _tiles(v, g.nkb + 1, g.bn)
    kvalid = _key_valid(key_padding_mask, sched)
    dq = torch.zeros_like(qt)
    dk, dv = torch.zeros_like(kt), torch.zeros_like(vt)
    for chunk in sched.chunks:
        C, T = chunk.k_tiles.shape
        qc, kc, vc = _gather(qt, kt, vt, chunk)
        do = dot[:, :, chunk.q_tiles]
        s = _masked_scores(qc, kc, chunk, sched, kvalid, G)
        p = s.sub_(lse_t[:, :, chunk.q_tiles][..., None]).exp_()
        dvc = torch.matmul(p.transpose(-1, -2), do)                       # [B, H, C, T*bn, Dv]
        dp = torch.matmul(do, vc.transpose(-1, -2))
        ds = dp.sub_(delta_t[:, :, chunk.q_tiles][..., None]).mul_(p)
        dq.index_add_(2, chunk.q_tiles, torch.matmul(ds, kc))
        flat = chunk.k_tiles.reshape(-1)
        dk.index_add_(2, flat, torch.matmul(ds.transpose(-1, -2), qc).view(B, Hk, C * T, g.bn, D))
        dv.index_add_(2, flat, dvc.view(B, Hk, C * T, g.bn, Dv))
    n_k = g.n_k
    return (_q_untiled(dq, g, G) * scale, dk.view(B, Hk, -1, D)[:, :, :n_k], dv.view(B, Hk, -1, Dv)[:, :, :n_k])
