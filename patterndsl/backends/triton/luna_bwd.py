"""Causal Luna, backward (notation, chunks and segments of luna_fwd.py), one program per chunk.

With `go_t = inv_t dout_t`: `dA_t = Vc_t go_t`, `dL_t = A_t * (dA_t - A_t . dA_t) * inv_t` (softmax backward
through the 1/n_t), `dq_t = s Kc_t dL_t`. `luna_bwd_dq_kernel` (from the forward's states) stores `A` and `dL`
(`[N, l]` each); `luna_rstate_kernel` walks each segment backward storing, before every chunk, the sums over the
later chunks of the segment of `s q_t^T dL_t` and `go_t^T A_t`, and the segment's totals; the launcher adds the
later segments. Then `dk_j = GK a_j`, `dv_j = a_j GV`, `da_j = k_j GK + GV v_j` (plus the in-chunk `t >= j`
terms), and `a = softplus_beta(x)` passes `da * sigmoid(beta x)` on to `c` and `p` (dp summed over chunks by
the launcher). dk/dv and da/dc/dp are two kernels, so each keeps few tiles alive.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .luna_fwd import BETA, _attn, _chunk_state, _packed_weights, _put_matrix, _rows


@triton.jit
def luna_bwd_dq_kernel(Q, K, V, P, C, KPM, INV, DO, KCH, VCH, KC, VC, DQ, AS, DLS, N, L, H, SEG, s,
                       BETA_: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       PREC: tl.constexpr, L_FIRST: tl.constexpr):
    """Program (c, bh): dq, A and dL of chunk c, from its states."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < N
    Kc = _chunk_state(KCH, KC, c, bh, SEG, BLOCK_T, BLOCK_D, BLOCK_L)
    VcT = _chunk_state(VCH, VC, c, bh, SEG, BLOCK_T, BLOCK_DV, BLOCK_L)
    a, _, _, _, _ = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L, PREC,
                                    L_FIRST)
    q = _rows(Q, bh, t, in_t, N, D, BLOCK_D)
    k = _rows(K, bh, t, in_t, N, D, BLOCK_D)
    v = _rows(V, bh, t, in_t, N, DV, BLOCK_DV)
    inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
    attn, causal = _attn(q, k, a, Kc, inv, t, L, s, BLOCK_L, PREC)
    go = _rows(DO, bh, t, in_t, N, DV, BLOCK_DV) * inv[:, None]
    gv = tl.where(causal, tl.dot(go, tl.trans(v), input_precision=PREC), 0.0)
    da = tl.dot(go, VcT, input_precision=PREC) + tl.dot(gv, a, input_precision=PREC)
    dl = attn * (da - tl.sum(attn * da, 1)[:, None]) * inv[:, None]
    dla = tl.where(causal, tl.dot(dl, tl.trans(a), input_precision=PREC), 0.0)
    dq = (tl.dot(dl, tl.trans(Kc), input_precision=PREC) + tl.dot(dla, k, input_precision=PREC)) * s
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    tl.store(DQ + bh64 * N * D + t[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=in_t[:, None] & (offs_d[None, :] < D))
    rows = bh64 * N + t
    tl.store(AS + rows[:, None] * BLOCK_L + offs_l[None, :], attn, mask=in_t[:, None])
    tl.store(DLS + rows[:, None] * BLOCK_L + offs_l[None, :], dl, mask=in_t[:, None])


@triton.jit
def _saved(AS, DLS, bh, t, in_t, N, BLOCK_L: tl.constexpr):
    rows = bh.to(tl.int64) * N + t
    offs_l = tl.arange(0, BLOCK_L)
    return (tl.load(AS + rows[:, None] * BLOCK_L + offs_l[None, :], mask=in_t[:, None], other=0.0),
            tl.load(DLS + rows[:, None] * BLOCK_L + offs_l[None, :], mask=in_t[:, None], other=0.0))


@triton.jit
def luna_rstate_kernel(Q, INV, DO, AS, DLS, GKH, GVH, GK_, GV_, N, H, SEG, s, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PREC: tl.constexpr, L_FIRST: tl.constexpr):
    """Program (bh, g): segment g walked backward; before each chunk c the sums over the later chunks of the
    segment, `s q^T dL` `[BD, BL]` and `go^T A` `[BDV, BL]`, go to GKH/GVH[c]; the totals to GK_/GV_[g]."""
    bh, g = tl.program_id(0), tl.program_id(1)
    n_bh = tl.num_programs(0)
    b = bh // H
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    GK = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    GVT = tl.zeros([BLOCK_DV, BLOCK_L], tl.float32)
    n_chunks = tl.cdiv(hi - lo, BLOCK_T)
    for i in range(0, n_chunks):
        t0 = lo + (n_chunks - 1 - i) * BLOCK_T                          # last chunk first
        row = (bh + (t0 // BLOCK_T) * n_bh).to(tl.int64)
        _put_matrix(GKH, row, GK, BLOCK_D, BLOCK_L)
        _put_matrix(GVH, row, GVT, BLOCK_DV, BLOCK_L)
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < hi
        attn, dl = _saved(AS, DLS, bh, t, in_t, N, BLOCK_L)
        inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
        GK += tl.dot(tl.trans(_rows(Q, bh, t, in_t, N, D, BLOCK_D) * s), dl, input_precision=PREC)
        GVT += tl.dot(tl.trans(_rows(DO, bh, t, in_t, N, DV, BLOCK_DV) * inv[:, None]), attn, input_precision=PREC)
    row = g.to(tl.int64) * n_bh + bh
    _put_matrix(GK_, row, GK, BLOCK_D, BLOCK_L)
    _put_matrix(GV_, row, GVT, BLOCK_DV, BLOCK_L)


@triton.jit
def luna_bwd_dkv_kernel(Q, K, V, P, C, KPM, INV, DO, AS, DLS, GKH, GVH, GK_, GV_, DK, DV_, DC, DPP, N, L, H, SEG, s,
                        BETA_: tl.constexpr, HAS_KPM: tl.constexpr, PART: tl.constexpr, D: tl.constexpr,
                        DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PREC: tl.constexpr, L_FIRST: tl.constexpr):
    """Program (c, bh) over the keys of chunk c: dk and dv (`PART` 0), or da, then dc and this chunk's part of
    dp^T (`PART` 1), from the sums over the later queries (chunk-local plus later segments) and the in-chunk
    queries `t >= j`."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < N
    GK = _chunk_state(GKH, GK_, c, bh, SEG, BLOCK_T, BLOCK_D, BLOCK_L)
    GVT = _chunk_state(GVH, GV_, c, bh, SEG, BLOCK_T, BLOCK_DV, BLOCK_L)
    a, x, cc, p, valid = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L,
                                         PREC, L_FIRST)
    qs = _rows(Q, bh, t, in_t, N, D, BLOCK_D) * s
    inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
    go = _rows(DO, bh, t, in_t, N, DV, BLOCK_DV) * inv[:, None]
    attn, dl = _saved(AS, DLS, bh, t, in_t, N, BLOCK_L)
    later = t[None, :] >= t[:, None]                                     # [j, t]: query t sees key j
    offs_d = tl.arange(0, BLOCK_D)
    out_mask = in_t[:, None] & (offs_d[None, :] < D)
    if PART == 0:
        dk = tl.dot(a, tl.trans(GK), input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(a, tl.trans(dl), input_precision=PREC), 0.0), qs, input_precision=PREC)
        dv = tl.dot(a, tl.trans(GVT), input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(a, tl.trans(attn), input_precision=PREC), 0.0), go, input_precision=PREC)
        offs_dv = tl.arange(0, BLOCK_DV)
        tl.store(DK + bh64 * N * D + t[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV_ + bh64 * N * DV + t[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=in_t[:, None] & (offs_dv[None, :] < DV))
    else:
        k = _rows(K, bh, t, in_t, N, D, BLOCK_D)
        v = _rows(V, bh, t, in_t, N, DV, BLOCK_DV)
        da = tl.dot(k, GK, input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(k, tl.trans(qs), input_precision=PREC), 0.0), dl, input_precision=PREC)
        da += tl.dot(v, GVT, input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(v, tl.trans(go), input_precision=PREC), 0.0), attn, input_precision=PREC)
        dx = tl.where(valid[:, None] & (tl.arange(0, BLOCK_L)[None, :] < L), da * tl.sigmoid(x * BETA_), 0.0) * s
        dc = tl.dot(dx, p, input_precision=PREC)
        tl.store(DC + bh64 * N * D + t[:, None] * D + offs_d[None, :], dc.to(DC.dtype.element_ty), mask=out_mask)
        _put_matrix(DPP, c.to(tl.int64) * tl.num_programs(1) + bh, tl.dot(tl.trans(cc), dx, input_precision=PREC),
                    BLOCK_D, BLOCK_L)


# ----------------------------------------------------------------------------------------------- launcher
def luna_bwd(dout, q, k, v, p, c, kpm, inv, chunks, states, combine, seg: int, n_seg: int, opts: dict):
    """(dq, dk, dv, dp, dc) of causal Luna; tensors contiguous, p `[B, H, l, D]`; `chunks`, `states` the
    forward's per-chunk and incoming states; `combine(totals)` turns segment totals into the sums over the later
    segments."""
    B, H, N, D = q.shape
    L = p.shape[2]
    bt, bd, bdv, bl = opts["BLOCK_T"], opts["BLOCK_D"], opts["BLOCK_DV"], opts["BLOCK_L"]
    nc = triton.cdiv(N, bt)
    dq, dk, dv, dc = (torch.empty_like(x) for x in (q, k, v, c))
    f32 = dict(dtype=torch.float32, device=q.device)
    scratch = torch.empty(2, B * H, N, bl, **f32)
    kpm = kpm if kpm is not None else inv
    flags = dict(BETA_=BETA, HAS_KPM=kpm is not inv, D=D, DV=v.shape[3], **opts)
    scalars = (N, L, H, seg, D ** -0.5)
    luna_bwd_dq_kernel[(nc, B * H)](q, k, v, p, c, kpm, inv, dout, *chunks, *states, dq, scratch[0], scratch[1],
                                    *scalars, **flags)
    gkh, gvh = torch.empty(nc, B * H, bd, bl, **f32), torch.empty(nc, B * H, bdv, bl, **f32)
    gk, gv = torch.empty(n_seg, B * H, bd, bl, **f32), torch.empty(n_seg, B * H, bdv, bl, **f32)
    luna_rstate_kernel[(B * H, n_seg)](q, inv, dout, scratch[0], scratch[1], gkh, gvh, gk, gv, N, H, seg, D ** -0.5,
                                       D=D, DV=v.shape[3], **opts)
    dpp = torch.empty(nc, B * H, bd, bl, **f32)
    later = (gkh, gvh, combine(gk), combine(gv))
    for part in (0, 1):
        luna_bwd_dkv_kernel[(nc, B * H)](q, k, v, p, c, kpm, inv, dout, scratch[0], scratch[1], *later, dk, dv, dc,
                                         dpp, *scalars, PART=part, **flags)
    dp = dpp.sum(0)[:, :D, :L].transpose(1, 2).reshape(B, H, L, D).to(p.dtype).contiguous()
    return dq, dk, dv, dp, dc
