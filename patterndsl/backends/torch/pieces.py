"""Bands plus global rows and columns as pieces merged by log-sum-exp, as a `torch.library` custom op.

A mask that `plan.decompose` splits into disjoint bands, global columns and global rows runs as:
each band on its own (a strided-window, causal or full piece of `band.py`; a band of step `s > 1` on tokens
permuted by residue mod `s`, so a dilated window or a strided pattern is a dense band per residue class),
the global columns as one small call of every query against those keys (minus the pairs a band already
has), all merged by log-sum-exp; then the global rows as one call of those queries against every key,
written over the merged rows. The backward runs every piece's flash backward with the final out and lse
(rows written over get lse +inf in the other pieces: they send those rows no gradient).

Query offsets: with query row r at position `o + r`, a band `lo <= i - j <= hi` of step s is the band
`lo - o <= r - j <= hi - o`; in residue classes the queries are first padded by `o mod s` rows at the front, so
that row class and key class meet as before, and the class band shifts by `o // s`. Global rows are the rows at
positions `o ..`; every mask evaluation takes the offset. Grouped-query k, v (fewer heads) go to the kernel as
they are (it reads kv head `h // G` for head h and sums dk, dv over the group).

>>> import torch
>>> from patterndsl.ir.mask import sliding, global_
>>> q = k = v = torch.randn(1, 2, 40, 8)
>>> out, lse = pieces_attention(q, k, v, sliding(3) | global_({0}), block=16)
>>> out.shape
torch.Size([1, 2, 40, 8])
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ir import mask as M
from ...plan.decompose import Decomposition, decompose, effective, in_classes
from ...plan.points import mask_at
from ..custom import register, register_softmax_autograd, spec
from .band import (POS_INF, Window, causal_bwd, causal_fwd, full_bwd, full_fwd, window_bwd, window_fwd)
from .flash import NEG_INF, additive, flash_bwd, flash_fwd, lse_dtype, merge

_LOW = (torch.float16, torch.bfloat16)


# -------------------------------------------------------------------------------- residue permutation
def _to_classes(x: Tensor, s: int, value: float = 0.0) -> Tensor:
    """`[B, H, n, ...]` -> `[B*s, H, ceil(n/s), ...]`: row r + s*a goes to class r, position a (padded with
    `value`)."""
    B, H, n = x.shape[:3]
    nc = -(-n // s)
    if nc * s != n:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, nc * s - n), value=value)
    x = x.reshape(B, H, nc, s, *x.shape[3:]).movedim(3, 1)
    return x.reshape(B * s, H, nc, *x.shape[4:])


def _from_classes(x: Tensor, s: int, n: int) -> Tensor:
    Bs, H, nc = x.shape[:3]
    x = x.reshape(Bs // s, s, H, nc, *x.shape[3:]).movedim(1, 3)
    return x.reshape(Bs // s, H, nc * s, *x.shape[4:])[:, :, :n]


def _valid_classes(kvalid: Tensor | None, B: int, n_k: int, s: int, device) -> Tensor | None:
    nc = -(-n_k // s)
    if kvalid is None and nc * s == n_k:
        return None
    ok = torch.ones(B, n_k, dtype=torch.bool, device=device) if kvalid is None else kvalid
    ok = F.pad(ok, (0, nc * s - n_k), value=False)
    return ok.view(B, nc, s).transpose(1, 2).reshape(B * s, nc)


# ---------------------------------------------------------------------------------------------- bands
def _shape_run(band: M.Band, bm: int, bwd: bool, args, kvalid, shift: int = 0):
    q, k = args[1:3] if bwd else args[:2]
    cb = effective(in_classes(band, shift), q.shape[2], k.shape[2])
    scale = args[-1]
    if isinstance(cb, M.Full):
        return (full_bwd if bwd else full_fwd)(*args, kvalid=kvalid)
    if cb.hi is None:
        return (causal_bwd if bwd else causal_fwd)(*args[:-1], scale, cb.lo, kvalid)
    return (window_bwd if bwd else window_fwd)(*args[:-1], scale, Window(cb.lo, cb.hi, bm), kvalid)


def _front(x: Tensor, rows: int, value: float = 0.0) -> Tensor:
    """`x [B, H, n, ...]` with `rows` rows of `value` put before row 0."""
    return F.pad(x, (0, 0) * (x.dim() - 3) + (rows, 0), value=value) if rows else x


def _band_fwd(q, k, v, scale, band: M.Band, bm: int, kvalid, q_offset: int = 0):
    s = band.step
    if s == 1:
        return _shape_run(band, bm, False, (q, k, v, scale), kvalid, q_offset)
    B, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    pre = q_offset % s                                     # query row r sits in class (q_offset + r) mod s
    kv = _valid_classes(kvalid, B, n_k, s, q.device)
    qc = _to_classes(_front(q, pre), s)
    o, l = _shape_run(band, bm, False, (qc, *(_to_classes(x, s) for x in (k, v)), scale), kv, q_offset // s)
    return _from_classes(o, s, pre + n_q)[:, :, pre:], _from_classes(l, s, pre + n_q)[:, :, pre:]


def _band_bwd(dout, q, k, v, out, lse, scale, band: M.Band, bm: int, kvalid, q_offset: int = 0):
    s = band.step
    if s == 1:
        return _shape_run(band, bm, True, (dout, q, k, v, out, lse, scale), kvalid, q_offset)
    B, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    pre = q_offset % s
    kv = _valid_classes(kvalid, B, n_k, s, q.device)
    lc = _to_classes(_front(lse, pre, POS_INF), s, POS_INF)       # padded query rows: no gradient
    rows = (_to_classes(_front(x, pre), s) for x in (dout, q))
    args = (*rows, *(_to_classes(x, s) for x in (k, v)), _to_classes(_front(out, pre), s), lc, scale)
    dq, dk, dv = _shape_run(band, bm, True, args, kv, q_offset // s)
    return _from_classes(dq, s, pre + n_q)[:, :, pre:], _from_classes(dk, s, n_k), _from_classes(dv, s, n_k)


# --------------------------------------------------------------------------------- global rows, columns
@functools.lru_cache(maxsize=64)
def _cols(d: Decomposition, n_q: int, n_k: int, o: int = 0):
    """(key indices [g], allowed bool [n_q, g]): the mask on the global columns minus the bands' pairs."""
    idx = torch.tensor(sorted(x for x in d.cols if 0 <= x < n_k), dtype=torch.long)
    i, j = torch.arange(n_q)[:, None], idx[None, :]
    ok = mask_at(d.mask, i, j, (n_q, n_k), q_offset=o) & ~mask_at(M.union(*d.bands), i, j, (n_q, n_k), q_offset=o)
    return idx, ok


@functools.lru_cache(maxsize=64)
def _rows(d: Decomposition, n_q: int, n_k: int, o: int = 0):
    """(query rows [r], allowed bool [r, n_k]): the whole mask on the global rows (at positions `o + r`)."""
    idx = torch.tensor(sorted(x - o for x in d.rows if 0 <= x - o < n_q), dtype=torch.long)
    return idx, mask_at(d.mask, idx[:, None], torch.arange(n_k)[None, :], (n_q, n_k), q_offset=o)


def _global_mask(ok: Tensor, kvalid, key_idx, dtype, device) -> Tensor:
    ok = ok.to(device)[None, None]
    if kvalid is not None:
        kv = kvalid if key_idx is None else kvalid[:, key_idx.to(device)]
        ok = ok & kv[:, None, None, :]
    return additive(ok, dtype)


# ------------------------------------------------------------------------------------------ fwd / bwd
def pieces_fwd(q, k, v, d: Decomposition, bm: int, scale: float, kvalid=None, q_offset: int = 0):
    """(out, lse) of the decomposed mask `d` (bands in query blocks of `bm` rows; row r at `q_offset + r`)."""
    n_q, n_k = q.shape[2], k.shape[2]
    out = lse = None
    for band in d.bands:
        o, l = _band_fwd(q, k, v, scale, band, bm, kvalid, q_offset)
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    if d.cols:
        idx, ok = _cols(d, n_q, n_k, q_offset)
        idx = idx.to(q.device)
        o, l = flash_fwd(q, k[:, :, idx], v[:, :, idx], scale, _global_mask(ok, kvalid, idx, q.dtype, q.device))
        out, lse = merge(out, lse, o, l)
    if d.rows:
        idx, ok = _rows(d, n_q, n_k, q_offset)
        idx = idx.to(q.device)
        o, l = flash_fwd(q[:, :, idx], k, v, scale, _global_mask(ok, kvalid, None, q.dtype, q.device))
        out, lse = out.index_copy(2, idx, o), lse.index_copy(2, idx, l)
    return out, lse


def pieces_bwd(dout, q, k, v, out, lse, d: Decomposition, bm: int, scale: float, kvalid=None, q_offset: int = 0):
    """(dq, dk, dv) from the final out and lse: every piece's flash backward, summed."""
    n_q, n_k = q.shape[2], k.shape[2]
    rows = _rows(d, n_q, n_k, q_offset)[0].to(q.device) if d.rows else None
    lse_b = lse if rows is None else lse.index_fill(2, rows, POS_INF)
    dq = dk = dv = None
    for band in d.bands:
        g = _band_bwd(dout, q, k, v, out, lse_b, scale, band, bm, kvalid, q_offset)
        dq, dk, dv = g if dq is None else (dq + g[0], dk + g[1], dv + g[2])
    if d.cols:
        idx, ok = _cols(d, n_q, n_k, q_offset)
        idx = idx.to(q.device)
        g = flash_bwd(dout, q, k[:, :, idx], v[:, :, idx], out, lse_b, scale,
                      _global_mask(ok, kvalid, idx, q.dtype, q.device))
        dq, dk, dv = dq + g[0], dk.index_add(2, idx, g[1]), dv.index_add(2, idx, g[2])
    if rows is not None:
        ok = _rows(d, n_q, n_k, q_offset)[1]
        g = flash_bwd(dout[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows], scale,
                      _global_mask(ok, kvalid, None, q.dtype, q.device))
        dq, dk, dv = dq.index_add(2, rows, g[0]), dk + g[1], dv + g[2]
    return dq, dk, dv


# ------------------------------------------------------------------------------------------- custom op
def _work(*xs):
    return [x.float() if x is not None and x.dtype in _LOW else x for x in xs]


def _empty(q, v):
    return q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0


@torch.library.custom_op("patterndsl::torch_pieces", mutates_args=())
def _pieces_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor],
               key: str, scale: float, q_offset: int) -> tuple[Tensor, Tensor]:
    _, mask, bm = spec(key)
    d = decompose(mask)
    B, H, n_q = q.shape[:3]
    if _empty(q, v) or k.shape[2] == 0:
        return q.new_zeros(B, H, n_q, v.shape[3]), q.new_full((B, H, n_q), NEG_INF, dtype=lse_dtype(q.dtype))
    kvalid = None if key_padding_mask is None else ~key_padding_mask
    out, lse = pieces_fwd(*_work(q, k, v), d, bm, scale, kvalid, q_offset)
    return out.to(q.dtype).contiguous(), lse.contiguous()


@_pieces_op.register_fake
def _(q, k, v, key_padding_mask, ids, key, scale, q_offset):
    B, H, NQ, _ = q.shape
    return q.new_empty(B, H, NQ, v.shape[3]), q.new_empty(B, H, NQ, dtype=lse_dtype(q.dtype))


@torch.library.custom_op("patterndsl::torch_pieces_bwd", mutates_args=())
def _pieces_bwd_op(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   lse: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor], key: str,
                   scale: float, q_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    _, mask, bm = spec(key)
    d = decompose(mask)
    if _empty(q, v) or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    work = _work(dout, q, k, v, out)
    if dlse is not None and bool(dlse.any()):             # a gradient of lse: the general chunked path
        from .blocksparse import blocksparse_bwd
        from .schedule import make_schedule
        sched = make_schedule(d.mask, q.shape[2], k.shape[2], 64, 64, q.shape[0] * q.shape[1], q_offset=q_offset)
        grads = blocksparse_bwd(*work, lse.to(work[1].dtype), sched, scale, key_padding_mask, dlse.to(work[1].dtype))
    else:
        kvalid = None if key_padding_mask is None else ~key_padding_mask
        grads = pieces_bwd(*work, lse, d, bm, scale, kvalid, q_offset)
    return tuple(g.to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v)))


@_pieces_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, ids, key, scale, q_offset):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_softmax_autograd(_pieces_op, _pieces_bwd_op)


def pieces_attention(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask, scale: float | None = None,
                     key_padding_mask: Tensor | None = None, block: int = 256, q_offset: int = 0):
    """(out `[B, H, N_q, D]`, lse `[B, H, N_q]`) of a mask of bands plus global rows/columns
    (`plan.decompose`; ValueError otherwise). q `[B, H, N_q, D]`, k, v `[B, H_kv, N_k, D]` with one head dim;
    query row r at position `q_offset + r`; `block` = query rows per window; differentiable in q, k, v."""
    if decompose(mask) is None:
        raise ValueError(f"not a union of bands and global rows/columns: {M.to_source(mask)}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    return _pieces_op(q, k, v, key_padding_mask, [], register("torch_pieces", mask, int(block)), scale,
                      int(q_offset))
