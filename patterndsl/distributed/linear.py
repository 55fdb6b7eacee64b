"""Linear attention (FAVOR+, relu, elu1) over sequence-sharded tensors: global sums, or prefix states by a scan.

The function is the reference's (`backends/reference/linear.py`). Bidirectional: every rank forms its keys'
`phi(K)^T [V, 1]` (FAVOR+ with the key stabiliser `c`, one max over all ranks' unpadded keys, all-reduced
first) and the sums are all-reduced; each rank then reads its rows. Causal: each segment of the sequence
(a rank holds one, or two under zig-zag) summarises its keys as the torch backend's `ScanState`
(`backends/torch/linear_scan.py`: decaying sums at the segment's own key max, the plain sums and the count).
The states are all-gathered; each segment folds those before it (rescaling to the larger max: the FAVOR+
running-max rescaling, exact) and runs the backend's chunked `causal_scan` from that state. Gradients flow
back through the same collectives (`links.py`).

Grouped-query attention: k, v have `H_kv` heads; sums and states are per kv head (the G query heads of a
group read them together, as in the torch backend), so what travels is per kv head.
"""
from __future__ import annotations

import torch

from ..backends.reference.features import favor_exponent
from ..backends.reference.linear import key_features, query_features, ratio
from ..backends.torch.linear_scan import ScanState, absorb, causal_scan, grouped
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
    """This rank's rows of linear attention over the sharded sequence (`fm` the feature map, `w` `[m, D]`);
    q `[B, H, n, D]`, k `[B, H_kv, n, D]`, v `[B, H_kv, n, D_v]`."""
    w = None if w is None else w.detach()
    if causal:
        return run(lambda links, q_, k_, v_: _causal(links, sh, fm, w, q_, k_, v_, kpm), comm, q, k, v)
    return run(lambda links, q_, k_, v_: _bidirectional(links, fm, w, q_, k_, v_, kpm), comm, q, k, v)


def _bidirectional(links, fm, w, q, k, v, kpm):
    dtype, (B, H, n, _) = q.dtype, q.shape
    q, k, v, valid = _prepare(q, k, v, kpm)
    fq = query_features(grouped(q, k), fm, w)                                            # [B, Hk, G, n, m]
    if isinstance(fm, Favor):
        ok = valid[:, None, :, None]
        u, a = favor_exponent(k, w)
        local = u.masked_fill(~ok, NEG_INF).amax((-1, -2)) if u.shape[2] else u.new_full(u.shape[:2], NEG_INF)
        c = links.reduce(local, "max")                                                  # [B, Hk]
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        fk = w.shape[0] ** -0.5 * (torch.exp(a.masked_fill(~ok, NEG_INF) - c[..., None, None]) + fm.eps) * ok
    else:
        fk = key_features(k, fm, w, valid)
    vz = torch.cat([v, valid[:, None, :, None].expand(*v.shape[:3], 1).to(v.dtype)], -1)
    kvz = links.reduce(torch.matmul(fk.transpose(-1, -2), vz))                           # [B, Hk, m, Dv + 1]
    numden = torch.matmul(fq, kvz[:, :, None])
    return ratio(numden[..., :-1], numden[..., -1]).reshape(B, H, n, -1).to(dtype)


# ------------------------------------------------------------------------------------------------ causal
def _pack(st: ScanState) -> torch.Tensor:
    """A state as one tensor `[B, Hk, m * Dv + m + Dv + 2]`: S, z, sv, cnt, r_ref."""
    B, Hk = st.S.shape[:2]
    cnt = st.cnt.reshape(B, 1, 1).expand(B, Hk, 1)
    return torch.cat([st.S.flatten(-2)[:, :, 0], st.z[:, :, 0], st.sv[:, :, 0], cnt, st.r_ref[:, :, 0]], -1)


def _unpack(x: torch.Tensor, m: int, dv: int) -> ScanState:
    B, Hk = x.shape[:2]
    S = x[..., :m * dv].reshape(B, Hk, 1, m, dv)
    z, rest = x[..., m * dv:m * dv + m].reshape(B, Hk, 1, m), x[..., m * dv + m:]
    return ScanState(S, z, rest[..., :dv].reshape(B, Hk, 1, dv), rest[:, :1, dv].reshape(B, 1, 1, 1),
                     rest[..., dv + 1:].reshape(B, Hk, 1, 1))


def _fold(states: list[torch.Tensor], m: int, dv: int) -> ScanState | None:
    """The state of consecutive segments' keys from theirs (packed, in order); None: no key before."""
    if not states:
        return None
    acc = _unpack(states[0], m, dv)
    for nxt in states[1:]:
        b = _unpack(nxt, m, dv)
        R = torch.maximum(acc.r_ref, b.r_ref)
        f1, f2 = (torch.where(torch.isfinite(x), torch.exp(x - torch.where(torch.isfinite(R), R, 0.0)), 0.0)
                  for x in (acc.r_ref, b.r_ref))
        acc = ScanState(acc.S * f1[..., None] + b.S * f2[..., None], acc.z * f1 + b.z * f2, acc.sv + b.sv,
                        acc.cnt + b.cnt, R)
    return acc


def _state(k, v, valid, fm, w) -> torch.Tensor:
    """The packed state of one segment's keys (k `[B, Hk, 1, n, D]`); a segment without an unpadded key has
    stabiliser -inf, so folding it leaves the states around it as they are."""
    B, Hk, _, n, D = k.shape
    m = D if w is None else w.shape[0]
    st = absorb(None, k, v, valid, fm, w) if n else ScanState.empty(B, Hk, m, v.shape[-1], v)
    none = (st.cnt == 0).expand_as(st.r_ref)
    return _pack(ScanState(st.S, st.z, st.sv, st.cnt, st.r_ref.masked_fill(none, NEG_INF)))


def _causal(links, sh, fm, w, q, k, v, kpm):
    dtype, (B, H, n, _), dv = q.dtype, q.shape, v.shape[-1]
    q, k, v, valid = _prepare(q, k, v, kpm)
    qg, kg, vg = grouped(q, k), k[:, :, None], v[:, :, None]
    rank, segs, offs = links.comm.rank, sh.segments, [sh.offsets(r) for r in range(sh.world_size)]
    most = max(len(s) for s in segs)
    mine = [_state(kg[..., o:o + b - s, :], vg[..., o:o + b - s, :], valid[:, o:o + b - s], fm, w)
            for (s, b), o in zip(segs[rank], offs[rank])]
    mine += [_state(kg[..., :0, :], vg[..., :0, :], valid[:, :0], fm, w)] * (most - len(mine))
    every = links.gather(torch.stack(mine))                                # [W, most, B, Hk, F]
    m = (every.shape[-1] - dv - 2) // (dv + 1)
    starts = sorted((s, r, x) for r in range(sh.world_size) for x, (s, b) in enumerate(segs[r]) if b > s)
    outs = []
    for (s, b), o in zip(segs[rank], offs[rank]):
        if b > s:
            prefix = _fold([every[r, x] for st, r, x in starts if st < s], m, dv)
            t = slice(o, o + b - s)
            outs.append(causal_scan(qg[..., t, :], kg[..., t, :], vg[..., t, :], valid[:, t], fm, w, CHUNK,
                                    prefix)[0])
    out = torch.cat(outs, -2) if outs else v.new_zeros(*qg.shape[:3], 0, dv)
    return out.reshape(B, H, n, dv).to(dtype)
