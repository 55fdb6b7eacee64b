"""Linear attention (FAVOR+, relu, elu1) over sequence-sharded tensors: global sums, or prefix states by a scan.

The function is the reference's (`backends/reference/linear.py`). Bidirectional: every rank forms its keys'
`phi(K)^T [V, 1]` (FAVOR+ with the key stabiliser `c`, one max over all ranks' unpadded keys, all-reduced
first) and the sums are all-reduced; each rank then reads its rows. Causal: each segment of the sequence
(a rank holds one, or two under zig-zag) summarises its keys as a state `(S, z, sv, cnt, R)`: the decaying
sums `S = sum_j exp(a_j - R) v_j^T`, `z = sum_j exp(a_j - R)` at the segment's own key max `R`, and the
non-decaying `sv = sum_j v_j`, `cnt` (unpadded keys). The states are all-gathered; each segment folds those
before it (rescaling to the larger max: the FAVOR+ running-max rescaling, exact) and runs the chunked scan
from that state, its running max starting at the prefix's. Gradients flow back through the same
collectives (`links.py`).
"""
from __future__ import annotations

import torch

from ..backends.reference.features import favor_exponent, favor_features
from ..backends.reference.linear import key_features, query_features, ratio
from ..ir.program import Favor
from .links import run

NEG_INF = float("-inf")
CHUNK = 256
_LOW = (torch.float16, torch.bfloat16)


def _prepare(q, k, v, kpm):
    work = torch.float32 if q.dtype in _LOW else q.dtype
    valid = (torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if kpm is None else ~kpm)
    ok = valid[:, None, :, None]
    return q.to(work), torch.where(ok, k.to(work), 0.0), torch.where(ok, v.to(work), 0.0), valid


def sharded_linear(comm, sh, fm, w, q, k, v, kpm, causal: bool) -> torch.Tensor:
    """This rank's rows of linear attention over the sharded sequence (`fm` the feature map, `w` `[m, D]`)."""
    w = None if w is None else w.detach()
    if causal:
        return run(lambda links, q_, k_, v_: _causal(links, sh, fm, w, q_, k_, v_, kpm), comm, q, k, v)
    return run(lambda links, q_, k_, v_: _bidirectional(links, fm, w, q_, k_, v_, kpm), comm, q, k, v)


def _bidirectional(links, fm, w, q, k, v, kpm):
    dtype = q.dtype
    q, k, v, valid = _prepare(q, k, v, kpm)
    fq = query_features(q, fm, w)
    if isinstance(fm, Favor):
        ok = valid[:, None, :, None]
        u, a = favor_exponent(k, w)
        local = u.masked_fill(~ok, NEG_INF).amax((-1, -2)) if u.shape[2] else u.new_full(u.shape[:2], NEG_INF)
        c = links.reduce(local, "max")                                                  # [B, H]
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        fk = w.shape[0] ** -0.5 * (torch.exp(a.masked_fill(~ok, NEG_INF) - c[..., None, None]) + fm.eps) * ok
    else:
        fk = key_features(k, fm, w, valid)
    vz = torch.cat([v, valid[:, None, :, None].expand(*v.shape[:3], 1).to(v.dtype)], -1)
    kvz = links.reduce(torch.matmul(fk.transpose(-1, -2), vz))                           # [B, H, m, Dv + 1]
    numden = torch.matmul(fq, kvz)
    return ratio(numden[..., :-1], numden[..., -1]).to(dtype)


# ------------------------------------------------------------------------------------------------ causal
def _terms(q, k, valid, fm, w):
    """(fq, u_max per key `[B, H, n]` (-inf on padding), a `[B, H, n, m]` (key exponents, or the plain
    features with u_max 0), eps part e)."""
    if not isinstance(fm, Favor):
        kf = key_features(k, fm, w, valid)
        return query_features(q, fm, w), torch.zeros(kf.shape[:3], dtype=kf.dtype, device=kf.device), kf, 0.0
    m = w.shape[0]
    u, a = favor_exponent(k, w)
    umax = u.amax(-1).masked_fill(~valid[:, None, :], NEG_INF)
    return favor_features(q, w, True, fm.eps), umax, a, m ** -0.5 * fm.eps


def _summary(a, v, umax, valid, favor: bool, m: int):
    """The state of a segment's keys, packed `[B, H, m * Dv + m + Dv + 2]`: S, z, sv, cnt, R."""
    B, H = a.shape[:2]
    if favor:
        R = umax.amax(-1) if umax.shape[-1] else torch.full((B, H), NEG_INF, dtype=a.dtype, device=a.device)
        safe = torch.where(torch.isfinite(R), R, torch.zeros_like(R))
        e = m ** -0.5 * torch.exp(a - safe[..., None, None]) * valid[:, None, :, None]
    else:
        R, e = torch.zeros(B, H, dtype=a.dtype, device=a.device), a
    wv = valid[:, None, :, None].to(v.dtype)
    S = torch.matmul(e.transpose(-1, -2), v)
    cnt = wv.sum((-1, -2)).expand(B, H)
    return torch.cat([S.flatten(-2), e.sum(-2), (v * wv).sum(-2), cnt[..., None], R[..., None]], -1)


def _unpack(state, m: int, dv: int):
    S = state[..., :m * dv].unflatten(-1, (m, dv))
    z, rest = state[..., m * dv:m * dv + m], state[..., m * dv + m:]
    return S, z, rest[..., :dv], rest[..., dv], rest[..., dv + 1]


def _fold(states, m: int, dv: int):
    """The state of consecutive segments' keys from theirs, in order (`[P, B, H, F]`); P = 0: no key."""
    if states.shape[0] == 0:
        return None
    acc = states[0]
    for nxt in states[1:]:
        S1, z1, sv1, c1, R1 = _unpack(acc, m, dv)
        S2, z2, sv2, c2, R2 = _unpack(nxt, m, dv)
        R = torch.maximum(R1, R2)
        f1, f2 = (torch.where(torch.isfinite(x), torch.exp(x - torch.where(torch.isfinite(R), R, 0.0)), 0.0)
                  for x in (R1, R2))
        acc = torch.cat([(S1 * f1[..., None, None] + S2 * f2[..., None, None]).flatten(-2),
                         z1 * f1[..., None] + z2 * f2[..., None], sv1 + sv2, (c1 + c2)[..., None], R[..., None]], -1)
    return acc


def _causal(links, sh, fm, w, q, k, v, kpm):
    dtype = q.dtype
    q, k, v, valid = _prepare(q, k, v, kpm)
    fq, umax, a, e = _terms(q, k, valid, fm, w)
    favor, m, dv = isinstance(fm, Favor), a.shape[-1], v.shape[-1]
    rank, segs, offs = links.comm.rank, sh.segments, [sh.offsets(r) for r in range(sh.world_size)]
    most = max(len(s) for s in segs)
    mine = [_summary(a[:, :, o:o + b - s], v[:, :, o:o + b - s], umax[:, :, o:o + b - s],
                     valid[:, o:o + b - s], favor, m) for (s, b), o in zip(segs[rank], offs[rank])]
    mine += [torch.zeros_like(mine[0])] * (most - len(mine))
    every = links.gather(torch.stack(mine))                                # [W, most, B, H, F]
    starts = sorted((s, r, x) for r in range(sh.world_size) for x, (s, b) in enumerate(segs[r]) if b > s)
    outs = []
    for (s, b), o in zip(segs[rank], offs[rank]):
        before = [every[r, x] for st, r, x in starts if st < s]
        prefix = _fold(torch.stack(before), m, dv) if before else None
        t = slice(o, o + b - s)
        outs.append(_scan(fq[:, :, t], a[:, :, t], v[:, :, t], umax[:, :, t], valid[:, t], prefix, e, favor, m))
    return torch.cat(outs, 2).to(dtype)


def _running_max(umax, R0):
    """Running max of the keys seen (the prefix's R0 included); before any key, the first later value."""
    if umax.shape[-1] == 0:
        return umax
    r = torch.maximum(umax.cummax(-1).values, R0[..., None])
    seen = torch.isfinite(r)
    first = torch.where(seen, r, torch.full_like(r, float("inf"))).amin(-1, keepdim=True)
    first = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    return torch.where(seen, r, first)


def _scan(fq, a, v, umax, valid, prefix, e, favor: bool, m: int):
    """Rows of one segment from the prefix state, by chunks of CHUNK keys (as `backends/torch/linear_scan.py`)."""
    B, H, n, _ = a.shape
    dv = v.shape[-1]
    if prefix is None:
        S, z, sv = v.new_zeros(B, H, m, dv), v.new_zeros(B, H, m), v.new_zeros(B, H, dv)
        cnt, R0 = v.new_zeros(B, H), torch.full((B, H), NEG_INF, dtype=v.dtype, device=v.device)
    else:
        S, z, sv, cnt, R0 = _unpack(prefix, m, dv)
    r = _running_max(umax, R0) if favor else torch.zeros_like(umax)
    kf = m ** -0.5 * torch.exp((a - r[..., None]).masked_fill(~valid[:, None, :, None], NEG_INF)) if favor else a
    r_ref = R0[..., None] if favor else r[..., :1]
    wv = valid[:, None, :, None].to(v.dtype)
    qsum, outs = fq.sum(-1), []
    for s0 in range(0, n, CHUNK):
        t = slice(s0, min(s0 + CHUNK, n))
        qc, kc, vc, rc, wc = fq[:, :, t], kf[:, :, t], v[:, :, t], r[:, :, t], wv[:, :, t]
        tri = torch.ones(qc.shape[2], qc.shape[2], dtype=torch.bool, device=v.device).tril()
        decay = torch.exp((rc[..., None, :] - rc[..., :, None]).masked_fill(~tri, NEG_INF))
        g = torch.matmul(qc, kc.transpose(-1, -2)) * decay + e * qsum[:, :, t, None] * (wc[..., 0][:, :, None, :] * tri)
        back = torch.where(torch.isfinite(r_ref), torch.exp(r_ref - rc), torch.zeros_like(rc))[..., None]
        num = torch.matmul(g, vc) + back * torch.matmul(qc, S) + e * qsum[:, :, t, None] * sv[:, :, None]
        den = (g.sum(-1) + back[..., 0] * torch.matmul(qc, z[..., None])[..., 0]
               + e * qsum[:, :, t] * cnt[:, :, None])
        outs.append(ratio(num, den))
        r_new = rc[..., -1:]
        grow = torch.where(torch.isfinite(r_ref), torch.exp(r_ref - r_new), torch.zeros_like(r_new))
        ks = kc * torch.exp(rc - r_new)[..., None]
        S = grow[..., None] * S + torch.matmul(ks.transpose(-1, -2), vc)
        z = grow * z + ks.sum(-2)
        sv, cnt = sv + (vc * wc).sum(-2), cnt + wc[..., 0].sum(-1)
        r_ref = r_new
    return torch.cat(outs, 2) if outs else v.new_zeros(B, H, 0, dv)
