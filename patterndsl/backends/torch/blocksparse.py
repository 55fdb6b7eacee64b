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

Grouped-query attention (k, v with `H_kv` heads, `G = H / H_kv` query heads each): the flash kernel takes such
k, v natively (head h reads kv head h // G, dk and dv summed over the group). The batched-matmul path stacks
query tile a of the G heads sharing a kv head as one `[G * bm, D]` tile (`_q_tiles`), scored against that kv
head's gathered tiles by the same matmul. K/V are never repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...plan.schedule import merge_by_lse
from .flash import NEG_INF, additive, flash_bwd, flash_fwd, runs
from .schedule import Schedule


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
    """(out `[B, H, N_q, D_v]`, lse `[B, H, N_q]`) of q `[B, H, N_q, D]`, k, v `[B, H_kv, N_k, D(_v)]`."""
    g = sched.grid
    B, H, _, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    lse_type = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not (B and H and g.n_q and g.n_k):                   # nothing to attend: zeros, lse -inf
        return q.new_zeros(B, H, g.n_q, Dv), q.new_full((B, H, g.n_q), NEG_INF, dtype=lse_type)
    if not runs(q, k, v):
        return _bmm_fwd(q, k, v, sched, scale, key_padding_mask)
    qt = _tiles(q, g.nqb, g.bm)
    kt, vt = _tiles(k, g.nkb + 1, g.bn), _tiles(v, g.nkb + 1, g.bn)
    kvalid = _key_valid(key_padding_mask, sched)
    out = q.new_zeros(B, H, g.nqb, g.bm, Dv)
    lse = q.new_full((B, H, g.nqb, g.bm), NEG_INF, dtype=lse_type)
    part_o = q.new_zeros(B, H, sched.slots + 1, g.bm, Dv)
    part_lse = q.new_full((B, H, sched.slots + 1, g.bm), NEG_INF, dtype=lse_type)
    for chunk in sched.chunks:
        qc, kc, vc = _gather(qt, kt, vt, chunk)
        allowed = _allowed(chunk, sched, kvalid)
        o, row_lse = _chunk_fwd(qc, kc, vc, allowed, scale)
        if chunk.direct.numel():
            d = chunk.direct
            out.index_copy_(2, chunk.q_tiles[d], o[:, :, d])
            lse.index_copy_(2, chunk.q_tiles[d], row_lse[:, :, d].to(lse_type))
        if chunk.split.numel():
            part_o.index_copy_(2, chunk.slots, o[:, :, chunk.split])
            part_lse.index_copy_(2, chunk.slots, row_lse[:, :, chunk.split].to(lse_type))
    _merge_split_rows(out, lse, part_o, part_lse, sched)
    n_q = g.n_q
    return out.view(B, H, -1, Dv)[:, :, :n_q], lse.view(B, H, -1)[:, :, :n_q]


def _merge_split_rows(out, lse, part_o, part_lse, sched: Schedule) -> None:
    """Rows split over several work items: their pieces merged by log-sum-exp into `out`, `lse` (in place)."""
    if sched.group_tiles.numel():
        merged, total = merge_by_lse(part_o[:, :, sched.groups], part_lse[:, :, sched.groups], dim=3)
        out.index_copy_(2, sched.group_tiles, merged.to(out.dtype))
        lse.index_copy_(2, sched.group_tiles, total.to(lse.dtype))


def _bmm_fwd(q, k, v, sched: Schedule, scale: float, key_padding_mask=None):
    """The forward by batched matmuls and separate softmax passes, query heads of a kv group stacked."""
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
    _merge_split_rows(out, lse, part_o, part_lse, sched)
    return _q_untiled(out, g, G), _q_untiled(lse, g, G)


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
    B, H, Hk, D, Dv = q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3]
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
            dqc, dkc, dvc = (x.reshape(C, B, x.shape[1] // B, *x.shape[2:]).movedim(0, 2) for x in grads)
        else:
            per = [flash_bwd(*(x[b].movedim(1, 0) for x in (rows[0], qc, kc, vc, rows[1], rows[2])), scale,
                             additive(allowed[b][:, None], q.dtype)) for b in range(B)]
            dqc, dkc, dvc = (torch.stack([p[i].movedim(0, 1) for p in per]) for i in range(3))
        dq.index_add_(2, chunk.q_tiles, dqc)
        flat = chunk.k_tiles.reshape(-1)
        dk.index_add_(2, flat, dkc.reshape(B, Hk, C * T, g.bn, D))
        dv.index_add_(2, flat, dvc.reshape(B, Hk, C * T, g.bn, Dv))
    n_q, n_k = g.n_q, g.n_k
    return (dq.view(B, H, -1, D)[:, :, :n_q], dk.view(B, Hk, -1, D)[:, :, :n_k],
            dv.view(B, Hk, -1, Dv)[:, :, :n_k])


def _bmm_bwd(dout, q, k, v, out, lse, sched: Schedule, scale: float, key_padding_mask=None, dlse=None):
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
