"""Block-sparse softmax attention in torch ops: forward (out, log-sum-exp) and a recomputing backward.

For each chunk of a `Schedule` the query tiles of its items (`[C, B*H, bm, D]`) and their gathered key/value
tiles (`[C, B*H, T * bn, D]`) go through one call of torch's fused CPU flash kernel (`flash.py`): scores,
mask, softmax and the product with V in one pass, with a float mask only where the chunk has partial or
padding tiles (per batch row, one call each, when keys are padded or ids differ per batch row). Items that
are their query tile's only item are written out directly; the pieces of split (skewed) rows are merged by
log-sum-exp. The backward calls the kernel's backward per chunk with the rows' *final* out and lse, which
gives every piece its exact gradient, and scatters dk, dv tile by tile with `index_add_`.

Where the kernel cannot run (D_v != D, another device, a gradient of lse) the same chunks go through
gathered batched matmuls and separate softmax passes (`_bmm_*`). Nothing larger than a chunk is materialised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .flash import NEG_INF, additive, flash_bwd, flash_fwd, runs
from .schedule import Schedule


def _tiles(x: torch.Tensor, n_tiles: int, block: int) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, n_tiles, block, D], zero padded at the end."""
    B, H, N, D = x.shape
    return F.pad(x, (0, 0, 0, n_tiles * block - N)).view(B, H, n_tiles, block, D)


def _key_valid(key_padding_mask, sched: Schedule) -> torch.Tensor | None:
    """bool [B, nkb + 1, bn]: unpadded keys (the extra tile is the padding tile)."""
    if key_padding_mask is None:
        return None
    g = sched.grid
    valid = F.pad(~key_padding_mask, (0, (g.nkb + 1) * g.bn - g.n_k), value=False)
    return valid.view(valid.shape[0], g.nkb + 1, g.bn)


def _allowed(chunk, sched: Schedule, kvalid) -> torch.Tensor | None:
    """bool `[B or 1, C, bm, T * bn]` of the chunk's allowed scores, or None when every score is allowed."""
    g = sched.grid
    if chunk.unmasked and kvalid is None:
        return None
    ok = chunk.allowed(g.bm, g.bn)
    ok = ok if ok.dim() == 4 else ok[None]
    if kvalid is not None:
        C, T = chunk.k_tiles.shape
        ok = ok & kvalid[:, chunk.k_tiles].view(kvalid.shape[0], C, 1, T * g.bn)
    return ok


def _pick(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """Tiles of `[B, H, n, block, ...]` (contiguous) at `tiles` (any shape) -> `[B, H, *tiles.shape, block, ...]`,
    by `index_select` over whole tiles (a row copy each, far faster than elementwise advanced indexing)."""
    B, H, n = x.shape[:3]
    out = x.reshape(B * H, n, -1).index_select(1, tiles.reshape(-1))
    return out.view(B, H, *tiles.shape, *x.shape[3:])


def _gather(qt, kt, vt, chunk):
    B, H = kt.shape[:2]
    C, T = chunk.k_tiles.shape
    kc = _pick(kt, chunk.k_tiles).view(B, H, C, T * kt.shape[3], kt.shape[4])
    vc = _pick(vt, chunk.k_tiles).view(B, H, C, T * vt.shape[3], vt.shape[4])
    return _pick(qt, chunk.q_tiles), kc, vc


def _rows_first(x: torch.Tensor) -> torch.Tensor:
    """[B, H, C, ...] -> [C, B*H, ...] as a view (B and H merge: the gather made them contiguous)."""
    x = x.movedim(2, 0)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _by_batch_row(allowed) -> bool:
    return allowed is not None and allowed.shape[0] > 1


def _chunk_fwd(qc, kc, vc, allowed, scale):
    """(o `[B, H, C, bm, Dv]`, lse `[B, H, C, bm]`) of one chunk through the flash kernel."""
    B, H, C, bm, _ = qc.shape
    if not _by_batch_row(allowed):
        mask = None if allowed is None else additive(allowed[0][:, None], qc.dtype)     # [C, 1, bm, W]
        o, lse = flash_fwd(_rows_first(qc), _rows_first(kc), _rows_first(vc), scale, mask)
        return o.view(C, B, H, bm, -1).movedim(0, 2), lse.view(C, B, H, bm).movedim(0, 2)
    outs = [flash_fwd(qc[b].movedim(1, 0), kc[b].movedim(1, 0), vc[b].movedim(1, 0), scale,
                      additive(allowed[b][:, None], qc.dtype)) for b in range(B)]
    return (torch.stack([o.movedim(0, 1) for o, _ in outs]), torch.stack([l.movedim(0, 1) for _, l in outs]))


def blocksparse_fwd(q, k, v, sched: Schedule, scale: float, key_padding_mask=None):
    """(out `[B, H, N_q, D_v]`, lse `[B, H, N_q]`) of q `[B, H, N_q, D]`, k, v `[B, H, N_k, D(_v)]`."""
    g = sched.grid
    B, H, _, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    lse_type = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not (B and H and g.n_q and g.n_k):                   # nothing to attend: zeros, lse -inf
        return q.new_zeros(B, H, g.n_q, Dv), q.new_full((B, H, g.n_q), NEG_INF, dtype=lse_type)
    fused = runs(q, k, v)
    qt = _tiles(q if fused else q * scale, g.nqb, g.bm)
    kt, vt = _tiles(k, g.nkb + 1, g.bn), _tiles(v, g.nkb + 1, g.bn)
    kvalid = _key_valid(key_padding_mask, sched)
    out = q.new_zeros(B, H, g.nqb, g.bm, Dv)
    lse = q.new_full((B, H, g.nqb, g.bm), NEG_INF, dtype=lse_type)
    part_o = q.new_zeros(B, H, sched.slots + 1, g.bm, Dv)
    part_lse = q.new_full((B, H, sched.slots + 1, g.bm), NEG_INF, dtype=lse_type)
    for chunk in sched.chunks:
        qc, kc, vc = _gather(qt, kt, vt, chunk)
        allowed = _allowed(chunk, sched, kvalid)
        o, row_lse = _chunk_fwd(qc, kc, vc, allowed, scale) if fused else _bmm_chunk_fwd(qc, kc, vc, allowed)
        if chunk.direct.numel():
            d = chunk.direct
            out.index_copy_(2, chunk.q_tiles[d], o[:, :, d])
            lse.index_copy_(2, chunk.q_tiles[d], row_lse[:, :, d].to(lse_type))
        if chunk.split.numel():
            part_o.index_copy_(2, chunk.slots, o[:, :, chunk.split])
            part_lse.index_copy_(2, chunk.slots, row_lse[:, :, chunk.split].to(lse_type))
    if sched.group_tiles.numel():
        po, pl = part_o[:, :, sched.groups], part_lse[:, :, sched.groups]     # [B, H, G, P, bm(, Dv)]
        total = torch.logsumexp(pl, dim=3)                                   # [B, H, G, bm]
        w = torch.exp(pl - total.masked_fill(total == NEG_INF, 0.0)[:, :, :, None]).to(po.dtype)
        out.index_copy_(2, sched.group_tiles, (w[..., None] * po).sum(3))
        lse.index_copy_(2, sched.group_tiles, total)
    n_q = g.n_q
    return out.view(B, H, -1, Dv)[:, :, :n_q], lse.view(B, H, -1)[:, :, :n_q]


def _bmm_chunk_fwd(qc, kc, vc, allowed):
    """The chunk by batched matmuls (q already scaled): scores, mask, softmax passes, product with V."""
    s = torch.matmul(qc, kc.transpose(-1, -2))
    if allowed is not None:
        s.masked_fill_(~allowed[:, None], NEG_INF)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill_(m == NEG_INF, 0.0)
    p = s.sub_(m).exp_()
    l = p.sum(-1)
    o = torch.matmul(p, vc).div_(l.masked_fill(l == 0, 1.0)[..., None])
    return o, m[..., 0] + torch.log(l)


# --------------------------------------------------------------------------------------------- backward
def blocksparse_bwd(dout, q, k, v, out, lse, sched: Schedule, scale: float, key_padding_mask=None, dlse=None):
    """(dq, dk, dv) from the saved output and log-sum-exp (probabilities recomputed chunk by chunk)."""
    if not (q.shape[0] and q.shape[1] and q.shape[2] and k.shape[2]):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if dlse is not None and not bool(dlse.any()):
        dlse = None
    if runs(q, k, v) and dlse is None:
        return _flash_bwd(dout, q, k, v, out, lse, sched, scale, key_padding_mask)
    return _bmm_bwd(dout, q, k, v, out, lse, sched, scale, key_padding_mask, dlse)


def _flash_bwd(dout, q, k, v, out, lse, sched: Schedule, scale: float, key_padding_mask=None):
    g = sched.grid
    B, H, D, Dv = q.shape[0], q.shape[1], q.shape[3], v.shape[3]
    qt, dot, ot = (_tiles(x, g.nqb, g.bm) for x in (q, dout, out))
    lse_t = _tiles(lse[..., None], g.nqb, g.bm)[..., 0]
    kt, vt = _tiles(k, g.nkb + 1, g.bn), _tiles(v, g.nkb + 1, g.bn)
    kvalid = _key_valid(key_padding_mask, sched)
    dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
    for chunk in sched.chunks:
        C, T = chunk.k_tiles.shape
        qc, kc, vc = _gather(qt, kt, vt, chunk)
        rows = (_pick(dot, chunk.q_tiles), _pick(ot, chunk.q_tiles), _pick(lse_t, chunk.q_tiles))
        allowed = _allowed(chunk, sched, kvalid)
        if not _by_batch_row(allowed):
            mask = None if allowed is None else additive(allowed[0][:, None], q.dtype)
            do, o, l = (_rows_first(x) for x in rows)
            grads = flash_bwd(do, _rows_first(qc), _rows_first(kc), _rows_first(vc), o, l, scale, mask)
            dqc, dkc, dvc = (x.reshape(C, B, H, *x.shape[2:]).movedim(0, 2) for x in grads)
        else:
            per = [flash_bwd(*(x[b].movedim(1, 0) for x in (rows[0], qc, kc, vc, rows[1], rows[2])), scale,
                             additive(allowed[b][:, None], q.dtype)) for b in range(B)]
            dqc, dkc, dvc = (torch.stack([p[i].movedim(0, 1) for p in per]) for i in range(3))
        dq.index_add_(2, chunk.q_tiles, dqc)
        flat = chunk.k_tiles.reshape(-1)
        dk.index_add_(2, flat, dkc.reshape(B, H, C * T, g.bn, D))
        dv.index_add_(2, flat, dvc.reshape(B, H, C * T, g.bn, Dv))
    n_q, n_k = g.n_q, g.n_k
    return dq.view(B, H, -1, D)[:, :, :n_q], dk.view(B, H, -1, D)[:, :, :n_k], dv.view(B, H, -1, Dv)[:, :, :n_k]


def _bmm_bwd(dout, q, k, v, out, lse, sched: Schedule, scale: float, key_padding_mask=None, dlse=None):
    g = sched.grid
    B, H, D, Dv = q.shape[0], q.shape[1], q.shape[3], v.shape[3]
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    qt = _tiles(q * scale, g.nqb, g.bm)
    dot = _tiles(dout, g.nqb, g.bm)
    lse_t = _tiles(lse.masked_fill(lse == NEG_INF, 0.0)[..., None], g.nqb, g.bm)[..., 0]
    delta_t = _tiles(delta[..., None], g.nqb, g.bm)[..., 0]
    kt, vt = _tiles(k, g.nkb + 1, g.bn), _tiles(v, g.nkb + 1, g.bn)
    kvalid = _key_valid(key_padding_mask, sched)
    dq = torch.zeros_like(qt)
    dk, dv = torch.zeros_like(kt), torch.zeros_like(vt)
    for chunk in sched.chunks:
        C, T = chunk.k_tiles.shape
        qc, kc, vc = _gather(qt, kt, vt, chunk)
        do = dot[:, :, chunk.q_tiles]
        s = torch.matmul(qc, kc.transpose(-1, -2))
        allowed = _allowed(chunk, sched, kvalid)
        if allowed is not None:
            s.masked_fill_(~allowed[:, None], NEG_INF)
        p = s.sub_(lse_t[:, :, chunk.q_tiles][..., None]).exp_()
        dvc = torch.matmul(p.transpose(-1, -2), do)                       # [B, H, C, T*bn, Dv]
        dp = torch.matmul(do, vc.transpose(-1, -2))
        ds = dp.sub_(delta_t[:, :, chunk.q_tiles][..., None]).mul_(p)
        dq.index_add_(2, chunk.q_tiles, torch.matmul(ds, kc))
        flat = chunk.k_tiles.reshape(-1)
        dk.index_add_(2, flat, torch.matmul(ds.transpose(-1, -2), qc).view(B, H, C * T, g.bn, D))
        dv.index_add_(2, flat, dvc.view(B, H, C * T, g.bn, Dv))
    n_q, n_k = g.n_q, g.n_k
    return (dq.view(B, H, -1, D)[:, :, :n_q] * scale, dk.view(B, H, -1, D)[:, :, :n_k],
            dv.view(B, H, -1, Dv)[:, :, :n_k])
