"""Band pieces on torch's fused CPU flash kernel: K/V read through strided windows, never gathered.

A window piece `lo <= i - j <= hi` (finite) cuts the queries into blocks of `bm` rows; block b needs the keys
`[b bm - hi, b bm + bm - 1 - lo]`, which lie inside `c` consecutive key blocks starting at block `b + f`
(`f = floor(-hi / bm)`). K and V are padded by whole blocks at both ends and viewed with `as_strided` as
`[blocks, B*H, c*bm, D]` overlapping windows (stride `bm` rows): one kernel call runs every block, with one
`[bm, c*bm]` additive mask shared by all interior blocks (the band's offsets are the same in every window).
Blocks whose window reaches padding keys (the ends) run in their own calls with per-block masks; with a
key padding mask every block gets its own mask, one call per batch row. The backward calls the kernel's
backward on the same views with the final out and lse and adds the window gradients back block by block
(`c` strided adds).

A causal piece `j <= i - lo` is the kernel's own `is_causal` on the queries shifted by `lo`; a full piece
is one plain call. All three take `kvalid` (bool `[B, N_k]`, True = a key that may be seen) or None.

>>> import torch
>>> q = k = v = torch.randn(1, 2, 50, 8)
>>> out, lse = window_fwd(q, k, v, 0.3, Window(-3, 3, 16))
>>> out.shape, lse.shape
(torch.Size([1, 2, 50, 8]), torch.Size([1, 2, 50]))
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flash import NEG_INF, additive, flash_bwd, flash_fwd, lse_dtype

POS_INF = float("inf")


@dataclass(frozen=True)
class Window:
    """The band `lo <= i - j <= hi` run in query blocks of `bm` rows."""
    lo: int
    hi: int
    bm: int


@dataclass(frozen=True)
class Geometry:
    nqb: int           # query blocks
    first: int         # f: block b's window starts at key block b + f
    c: int             # key blocks per window
    pad: int           # key blocks of padding before key 0
    kblocks: int       # key blocks of the padded K
    regions: tuple     # (b0, b1, per-block masks?) covering [0, nqb)

    def width(self, bm: int) -> int:
        return self.c * bm


@functools.lru_cache(maxsize=256)
def geometry(win: Window, n_q: int, n_k: int) -> Geometry:
    bm = win.bm
    nqb = -(-n_q // bm)
    f = (-win.hi) // bm                                          # floor(-hi / bm)
    last = (bm - 1 - win.lo) // bm
    c = last - f + 1
    pad = max(0, -f)
    kblocks = max(pad + nqb + last, pad + -(-n_k // bm), 1)
    lo_b = min(nqb, max(0, -f))                                   # windows from here start at key >= 0
    hi_b = max(lo_b, min(nqb, n_k // bm - f - c + 1))             # and up to here end at key <= n_k
    regions = tuple((a, b, masked) for a, b, masked in ((0, lo_b, True), (lo_b, hi_b, False), (hi_b, nqb, True))
                    if b > a)
    return Geometry(nqb, f, c, pad, kblocks, regions)


@functools.lru_cache(maxsize=64)
def _band_ok(win: Window, f: int, c: int) -> torch.Tensor:
    """bool `[bm, c*bm]`: row r of a block meets window key t when lo <= r - t - f*bm <= hi."""
    r = torch.arange(win.bm)[:, None]
    d = r - torch.arange(c * win.bm)[None, :] - f * win.bm
    return (d >= win.lo) & (d <= win.hi)


@functools.lru_cache(maxsize=64)
def _band_mask(win: Window, f: int, c: int, dtype: torch.dtype, device) -> torch.Tensor:
    return additive(_band_ok(win, f, c).to(device), dtype)


def _key_ok(geo: Geometry, bm: int, n_k: int, kvalid, device) -> torch.Tensor:
    """bool `[B or 1, kblocks*bm]`: padded key positions that exist (and are not padding keys)."""
    start = geo.pad * bm
    ok = torch.zeros(1 if kvalid is None else kvalid.shape[0], geo.kblocks * bm, dtype=torch.bool, device=device)
    ok[:, start:start + n_k] = True if kvalid is None else kvalid
    return ok


def _region_mask(win, geo, b0, b1, key_ok_row, dtype) -> torch.Tensor:
    """Additive `[b1 - b0, 1, bm, c*bm]` for blocks b0..b1 (band and key existence)."""
    bm, W = win.bm, geo.width(win.bm)
    start = (b0 + geo.first + geo.pad) * bm
    seen = key_ok_row.as_strided((b1 - b0, W), (bm, 1), key_ok_row.storage_offset() + start)
    ok = _band_ok(win, geo.first, geo.c).to(seen.device)[None] & seen[:, None, :]
    return additive(ok[:, None], dtype)


# ------------------------------------------------------------------------------------------------ views
def _blocks(x: torch.Tensor, nqb: int, bm: int, b0: int, b1: int) -> torch.Tensor:
    """`[B, H, nqb*bm, ...]` (contiguous) -> blocks b0..b1 as `[b1 - b0, B*H, bm, ...]` (a view)."""
    B, H = x.shape[:2]
    return x.reshape(B * H, nqb, bm, *x.shape[3:])[:, b0:b1].transpose(0, 1)


def _windows(k: torch.Tensor, geo: Geometry, bm: int, b0: int, b1: int) -> torch.Tensor:
    """Overlapping windows `[b1 - b0, B*H, c*bm, D]` over the keys of blocks b0..b1 (`k` contiguous `[B, H, N_k,
    D]`): straight views of `k` where the windows lie inside it, else views of a padded copy of just the
    keys they reach (zeros beyond the ends; the masks exclude them)."""
    B, H, n_k, D = k.shape
    first, end = (b0 + geo.first) * bm, (b1 - 1 + geo.first + geo.c) * bm       # key range, exclusive end
    if first < 0 or end > n_k:
        lo, hi = max(first, 0), min(end, n_k)
        if lo < hi:
            k = F.pad(k[:, :, lo:hi], (0, 0, lo - first, end - hi)).contiguous()
        else:
            k = k.new_zeros(B, H, end - first, D)
        first = 0
    L = k.shape[2]
    return k.as_strided((b1 - b0, B * H, geo.width(bm), D), (bm * D, L * D, D, 1), k.storage_offset() + first * D)


def _pad_rows(x: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    extra = rows - x.shape[2]
    if extra == 0:
        return x.contiguous()
    pad = (0, extra) if x.dim() == 3 else (0, 0, 0, extra)
    return F.pad(x, pad, value=value).contiguous()


# ---------------------------------------------------------------------------------------------- windows
def window_fwd(q, k, v, scale: float, win: Window, kvalid=None):
    """(out `[B, H, N_q, D]`, lse `[B, H, N_q]`) of the band piece `win`."""
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    geo = geometry(win, n_q, n_k)
    bm = win.bm
    qp = _pad_rows(q, geo.nqb * bm)
    kp, vp = k.contiguous(), v.contiguous()
    out = q.new_empty(B, H, geo.nqb * bm, v.shape[3])
    lse = q.new_empty(B, H, geo.nqb * bm, dtype=lse_dtype(q.dtype))
    for b, (qb, kb, vb, ob, lb, ok) in enumerate(_calls(geo, bm, n_k, kvalid, qp, kp, vp, out, lse)):
        for b0, b1, mask in _masks(win, geo, ok, q.dtype, q.device, per_block=kvalid is not None):
            inside = mask.dim() == 2                     # the shared band mask: every row has a key
            o, l = flash_fwd(_blocks(qb, geo.nqb, bm, b0, b1), _windows(kb, geo, bm, b0, b1),
                             _windows(vb, geo, bm, b0, b1), scale, mask, rows_have_keys=inside)
            _blocks(ob, geo.nqb, bm, b0, b1).copy_(o)
            _blocks(lb, geo.nqb, bm, b0, b1).copy_(l)
    return out[:, :, :n_q], lse[:, :, :n_q]


def _calls(geo, bm, n_k, kvalid, *tensors):
    """The tensors of each kernel call group: all batch rows at once, or one batch row at a time."""
    ok = _key_ok(geo, bm, n_k, kvalid, tensors[0].device)
    if kvalid is None:
        yield (*tensors, ok[0])
        return
    for b in range(tensors[0].shape[0]):
        yield (*(t[b:b + 1] for t in tensors), ok[b])


def _masks(win, geo, key_ok_row, dtype, device, per_block: bool):
    """(b0, b1, additive mask) of each call: the shared band mask inside, per-block masks at the ends."""
    if per_block:
        yield 0, geo.nqb, _region_mask(win, geo, 0, geo.nqb, key_ok_row, dtype)
        return
    for b0, b1, masked in geo.regions:
        mask = _region_mask(win, geo, b0, b1, key_ok_row, dtype) if masked else \
            _band_mask(win, geo.first, geo.c, dtype, device)
        yield b0, b1, mask


def window_bwd(dout, q, k, v, out, lse, scale: float, win: Window, kvalid=None):
    """(dq, dk, dv) of the band piece from the rows' final out and lse."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    geo = geometry(win, n_q, n_k)
    bm, rows = win.bm, geo.nqb * win.bm
    qp, dop, op = (_pad_rows(x, rows) for x in (q, dout, out))
    lp = _pad_rows(lse, rows, POS_INF)                  # padded rows: no gradient
    kp, vp = k.contiguous(), v.contiguous()
    dq = torch.empty_like(qp)
    Hk = k.shape[1]                                     # grouped heads: the kernel sums dk, dv over a group
    dk = k.new_zeros(B, Hk, geo.kblocks * bm, D)        # in padded key coordinates (key j at pad*bm + j)
    dv = v.new_zeros(B, Hk, geo.kblocks * bm, v.shape[3])
    for qb, kb, vb, dob, ob, lb, dqb, dkb, dvb, ok in _calls(geo, bm, n_k, kvalid, qp, kp, vp, dop, op, lp,
                                                              dq, dk, dv):
        for b0, b1, mask in _masks(win, geo, ok, q.dtype, q.device, per_block=kvalid is not None):
            g = flash_bwd(*(_blocks(x, geo.nqb, bm, b0, b1) for x in (dob, qb)),
                          _windows(kb, geo, bm, b0, b1), _windows(vb, geo, bm, b0, b1),
                          *(_blocks(x, geo.nqb, bm, b0, b1) for x in (ob, lb)), scale, mask)
            _blocks(dqb, geo.nqb, bm, b0, b1).copy_(g[0])
            _overlap_add(dkb, g[1], geo, bm, b0)
            _overlap_add(dvb, g[2], geo, bm, b0)
    start = geo.pad * bm
    return dq[:, :, :n_q], dk[:, :, start:start + n_k], dv[:, :, start:start + n_k]


def _overlap_add(dst: torch.Tensor, win_grad: torch.Tensor, geo: Geometry, bm: int, b0: int) -> None:
    """Add window gradients `[nb, B*H, c*bm, D]` back into the padded `[B, H, L, D]`, one key block at a time."""
    B, H, L, D = dst.shape
    kb = dst.view(B * H, L // bm, bm, D).transpose(0, 1)            # [kblocks, B*H, bm, D]
    nb, s = win_grad.shape[0], b0 + geo.first + geo.pad
    for t in range(geo.c):
        kb[s + t:s + t + nb].add_(win_grad[:, :, t * bm:(t + 1) * bm])


# ------------------------------------------------------------------------------------- causal and full
def _causal_rows(q, lo: int):
    """The queries the kernel's top-left causal rule needs for `j <= i - lo`: row i becomes row i - lo."""
    return q[:, :, lo:] if lo >= 0 else F.pad(q, (0, 0, -lo, 0))


def _kv_mask(kvalid, dtype):
    return None if kvalid is None else additive(kvalid[:, None, None, :], dtype)


def causal_fwd(q, k, v, scale: float, lo: int, kvalid=None):
    """(out, lse) of the piece `j <= i - lo` (rows i < lo see nothing)."""
    B, H, n_q, _ = q.shape
    o, l = flash_fwd(_causal_rows(q, lo), k, v, scale, _kv_mask(kvalid, q.dtype), causal=True)
    if kvalid is not None:                              # rows whose causal keys are all padding
        first = torch.where(kvalid.any(1), kvalid.float().argmax(1), k.shape[2])      # [B]
        dead = torch.arange(l.shape[2], device=q.device)[None, :] < first[:, None]
        l.masked_fill_(dead[:, None], NEG_INF)
        o.masked_fill_(dead[:, None, :, None], 0.0)
    if lo >= 0:
        out = q.new_zeros(B, H, n_q, v.shape[3])
        lse = q.new_full((B, H, n_q), NEG_INF, dtype=l.dtype)
        out[:, :, lo:], lse[:, :, lo:] = o, l
        return out, lse
    return o[:, :, -lo:], l[:, :, -lo:]


def causal_bwd(dout, q, k, v, out, lse, scale: float, lo: int, kvalid=None):
    """(dq, dk, dv) of the causal piece from the final out and lse."""
    rows = [_causal_rows(x, lo) for x in (dout, q, out)]
    l = lse[:, :, lo:] if lo >= 0 else F.pad(lse, (-lo, 0), value=POS_INF)
    dq, dk, dv = flash_bwd(rows[0], rows[1], k, v, rows[2], l, scale, _kv_mask(kvalid, q.dtype), causal=True)
    if lo >= 0:
        return F.pad(dq, (0, 0, q.shape[2] - dq.shape[2], 0)), dk, dv
    return dq[:, :, -lo:], dk, dv


def full_fwd(q, k, v, scale: float, kvalid=None):
    return flash_fwd(q, k, v, scale, _kv_mask(kvalid, q.dtype))


def full_bwd(dout, q, k, v, out, lse, scale: float, kvalid=None):
    return flash_bwd(dout, q, k, v, out, lse, scale, _kv_mask(kvalid, q.dtype))
