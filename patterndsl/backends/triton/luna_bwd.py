"""Causal Luna, backward (notation of luna_fwd.py): a forward walk for dq, then a reverse walk for dk, dv, dc, dp,
both over parallel segments.

With `go_t = inv_t dout_t`: `dA_t = Vc_t go_t`, `dL_t = A_t * (dA_t - A_t . dA_t) * inv_t` (softmax backward
through the 1/n_t), `dq_t = s Kc_t dL_t`. The forward walk (from the forward's states) stores `A` and `dL`
(`[N, l]` each); `luna_rstate_kernel` sums each segment's `s q_t^T dL_t` and `A_t^T go_t`, the launcher
turns them into the sums over later segments `GK`, `GV`, and the reverse walk gives `dk_j = GK a_j`,
`dv_j = a_j GV`, `da_j = k_j GK + GV v_j` (plus the in-chunk `t >= j` terms); `a = softplus_beta(x)` passes
`da * sigmoid(beta x)` on to `c` and `p` (dp summed over segments by the launcher).
"""
from __future__ import annotations

import torch
import triton.language as tl
import triton

from .luna_fwd import BETA, _attn, _matrix, _packed_weights, _put_matrix, _rows


@triton.jit
def luna_bwd_dq_kernel(Q, K, V, P, C, KPM, INV, DO, KC, VC, DQ, AS, DLS, N, L, H, SEG, s, BETA_: tl.constexpr,
                       HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, g): dq, A and dL of segment g, walked from the states before it."""
    bh, g = tl.program_id(0), tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    row = g.to(tl.int64) * tl.num_programs(0) + bh
    Kc = _matrix(KC, row, BLOCK_D, BLOCK_L)
    Vc = _matrix(VC, row, BLOCK_L, BLOCK_DV)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < hi
        a, _, _, _, _ = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L,
                                        PREC)
        q = _rows(Q, bh, t, in_t, N, D, BLOCK_D)
        k = _rows(K, bh, t, in_t, N, D, BLOCK_D)
        v = _rows(V, bh, t, in_t, N, DV, BLOCK_DV)
        inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
        attn, causal = _attn(q, k, a, Kc, inv, t, L, s, BLOCK_L, PREC)
        go = _rows(DO, bh, t, in_t, N, DV, BLOCK_DV) * inv[:, None]
        gv = tl.where(causal, tl.dot(go, tl.trans(v), input_precision=PREC), 0.0)
        da = tl.dot(go, tl.trans(Vc), input_precision=PREC) + tl.dot(gv, a, input_precision=PREC)
        dl = attn * (da - tl.sum(attn * da, 1)[:, None]) * inv[:, None]
        dla = tl.where(causal, tl.dot(dl, tl.trans(a), input_precision=PREC), 0.0)
        dq = (tl.dot(dl, tl.trans(Kc), input_precision=PREC) + tl.dot(dla, k, input_precision=PREC)) * s
        tl.store(DQ + bh64 * N * D + t[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=in_t[:, None] & (offs_d[None, :] < D))
        rows = bh64 * N + t
        tl.store(AS + rows[:, None] * BLOCK_L + offs_l[None, :], attn, mask=in_t[:, None])
        tl.store(DLS + rows[:, None] * BLOCK_L + offs_l[None, :], dl, mask=in_t[:, None])
        Kc += tl.dot(tl.trans(k), a, input_precision=PREC)
        Vc += tl.dot(tl.trans(a), v, input_precision=PREC)


@triton.jit
def luna_rstate_kernel(Q, INV, DO, AS, DLS, GKS, GVS, N, H, SEG, s, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, g): `sum s q^T dL` and `sum A^T go` over segment g."""
    bh, g = tl.program_id(0), tl.program_id(1)
    b = bh // H
    offs_l = tl.arange(0, BLOCK_L)
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    GK = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    GV = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < hi
        rows = bh.to(tl.int64) * N + t
        attn = tl.load(AS + rows[:, None] * BLOCK_L + offs_l[None, :], mask=in_t[:, None], other=0.0)
        dl = tl.load(DLS + rows[:, None] * BLOCK_L + offs_l[None, :], mask=in_t[:, None], other=0.0)
        inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
        GK += tl.dot(tl.trans(_rows(Q, bh, t, in_t, N, D, BLOCK_D) * s), dl, input_precision=PREC)
        GV += tl.dot(tl.trans(attn), _rows(DO, bh, t, in_t, N, DV, BLOCK_DV) * inv[:, None], input_precision=PREC)
    row = g.to(tl.int64) * tl.num_programs(0) + bh
    _put_matrix(GKS, row, GK, BLOCK_D, BLOCK_L)
    _put_matrix(GVS, row, GV, BLOCK_L, BLOCK_DV)


@triton.jit
def luna_bwd_dkv_kernel(Q, K, V, P, C, KPM, INV, DO, AS, DLS, GKS, GVS, DK, DV_, DC, DPP, N, L, H, SEG, s,
                        BETA_: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, g): dk, dv, dc of segment g walked backward from the sums over later segments, and this
    segment's part of dp."""
    bh, g = tl.program_id(0), tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    row = g.to(tl.int64) * tl.num_programs(0) + bh
    GK = _matrix(GKS, row, BLOCK_D, BLOCK_L)
    GV = _matrix(GVS, row, BLOCK_L, BLOCK_DV)
    dp = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_l = tl.arange(0, BLOCK_L)
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    n_chunks = tl.cdiv(hi - lo, BLOCK_T)
    for i in range(0, n_chunks):
        t = lo + (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)      # last chunk first
        in_t = t < hi
        a, x, c, p, valid = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D,
                                            BLOCK_L, PREC)
        qs = _rows(Q, bh, t, in_t, N, D, BLOCK_D) * s
        k = _rows(K, bh, t, in_t, N, D, BLOCK_D)
        v = _rows(V, bh, t, in_t, N, DV, BLOCK_DV)
        inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
        go = _rows(DO, bh, t, in_t, N, DV, BLOCK_DV) * inv[:, None]
        rows = bh64 * N + t
        attn = tl.load(AS + rows[:, None] * BLOCK_L + offs_l[None, :], mask=in_t[:, None], other=0.0)
        dl = tl.load(DLS + rows[:, None] * BLOCK_L + offs_l[None, :], mask=in_t[:, None], other=0.0)
        later = t[None, :] >= t[:, None]                                 # [j, t]: query t sees key j
        dk = tl.dot(a, tl.trans(GK), input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(a, tl.trans(dl), input_precision=PREC), 0.0), qs, input_precision=PREC)
        da = tl.dot(k, GK, input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(k, tl.trans(qs), input_precision=PREC), 0.0), dl, input_precision=PREC)
        dv = tl.dot(a, GV, input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(a, tl.trans(attn), input_precision=PREC), 0.0), go, input_precision=PREC)
        da += tl.dot(v, tl.trans(GV), input_precision=PREC) + tl.dot(
            tl.where(later, tl.dot(v, tl.trans(go), input_precision=PREC), 0.0), attn, input_precision=PREC)
        dx = tl.where(valid[:, None] & (offs_l[None, :] < L), da * tl.sigmoid(x * BETA_), 0.0) * s
        dc = tl.dot(dx, p, input_precision=PREC)
        dp += tl.dot(tl.trans(dx), c, input_precision=PREC)
        out_mask = in_t[:, None] & (offs_d[None, :] < D)
        tl.store(DK + bh64 * N * D + t[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DC + bh64 * N * D + t[:, None] * D + offs_d[None, :], dc.to(DC.dtype.element_ty), mask=out_mask)
        tl.store(DV_ + bh64 * N * DV + t[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=in_t[:, None] & (offs_dv[None, :] < DV))
        GK += tl.dot(tl.trans(qs), dl, input_precision=PREC)
        GV += tl.dot(tl.trans(attn), go, input_precision=PREC)
    _put_matrix(DPP, row, dp, BLOCK_L, BLOCK_D)


# ----------------------------------------------------------------------------------------------- launcher
def luna_bwd(dout, q, k, v, p, c, kpm, inv, states, suffix, seg: int, n_seg: int, opts: dict):
    """(dq, dk, dv, dp, dc) of causal Luna; tensors contiguous, p `[B, H, l, D]`; `states` the forward's states
    before each segment, `suffix(local)` turns local segment sums into sums over later segments."""
    B, H, N, D = q.shape
    L = p.shape[2]
    dq, dk, dv, dc = (torch.empty_like(x) for x in (q, k, v, c))
    f32 = dict(dtype=torch.float32, device=q.device)
    scratch = torch.empty(2, B * H, N, opts["BLOCK_L"], **f32)
    kpm = kpm if kpm is not None else inv
    flags = dict(BETA_=BETA, HAS_KPM=kpm is not inv, D=D, DV=v.shape[3], **opts)
    scalars = (N, L, H, seg, D ** -0.5)
    luna_bwd_dq_kernel[(B * H, n_seg)](q, k, v, p, c, kpm, inv, dout, *states, dq, scratch[0], scratch[1], *scalars,
                                       **flags)
    gk = torch.empty(n_seg, B * H, opts["BLOCK_D"], opts["BLOCK_L"], **f32)
    gv = torch.empty(n_seg, B * H, opts["BLOCK_L"], opts["BLOCK_DV"], **f32)
    luna_rstate_kernel[(B * H, n_seg)](q, inv, dout, scratch[0], scratch[1], gk, gv, N, H, seg, D ** -0.5, D=D,
                                       DV=v.shape[3], **opts)
    dpp = torch.empty(n_seg, B * H, opts["BLOCK_L"], opts["BLOCK_D"], **f32)
    luna_bwd_dkv_kernel[(B * H, n_seg)](q, k, v, p, c, kpm, inv, dout, scratch[0], scratch[1], suffix(gk),
                                        suffix(gv), dk, dv, dc, dpp, *scalars, **flags)
    dp = dpp.sum(0)[:, :L, :D].reshape(B, H, L, D).to(p.dtype)
    return dq, dk, dv, dp, dc
