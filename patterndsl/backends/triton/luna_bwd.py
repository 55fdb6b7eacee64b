"""Causal Luna, backward (notation of luna_fwd.py): a forward scan for dq, then a reverse scan for dk, dv, dc, dp.

With `go_t = inv_t dout_t`: `dA_t = Vc_t go_t`, `dL_t = A_t * (dA_t - A_t . dA_t) * inv_t` (softmax backward
through the 1/n_t), `dq_t = s Kc_t dL_t`. The forward scan stores `A` and `dL` (`[N, l]` each); the reverse
scan keeps `GK = sum_{t later} s q_t^T dL_t` and `GV = sum_{t later} A_t^T go_t`, from which
`dk_j = GK a_j`, `dv_j = a_j GV`, `da_j = k_j GK + GV v_j` (plus the in-chunk `t >= j` terms), and
`a = softplus_beta(x)` passes `da * sigmoid(beta x)` on to `c` and `p`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .luna_fwd import BETA, _attn, _packed_weights, _rows, luna_meta


@triton.jit
def luna_bwd_dq_kernel(Q, K, V, P, C, KPM, INV, DO, DQ, AS, DLS, N, L, H, s, BETA_: tl.constexpr,
                       HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    bh64 = bh.to(tl.int64)
    Kc = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    Vc = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    for t0 in range(0, N, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < N
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
def luna_bwd_dkv_kernel(Q, K, V, P, C, KPM, INV, DO, AS, DLS, DK, DV_, DC, DP, N, L, H, s, BETA_: tl.constexpr,
                        HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    bh64 = bh.to(tl.int64)
    GK = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    GV = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    dp = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_l = tl.arange(0, BLOCK_L)
    n_chunks = tl.cdiv(N, BLOCK_T)
    for i in range(0, n_chunks):
        t = (n_chunks - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)      # last chunk first
        in_t = t < N
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
    tl.store(DP + bh64 * L * D + offs_l[:, None] * D + offs_d[None, :], dp.to(DP.dtype.element_ty),
             mask=(offs_l[:, None] < L) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------- launcher
def luna_bwd(dout, q, k, v, p, c, key_padding_mask, inv):
    """(dq, dk, dv, dp, dc) of causal Luna; tensors contiguous, p `[B, H, l, D]`."""
    B, H, N, D = q.shape
    grads = [torch.zeros_like(x) for x in (q, k, v, p, c)]
    if not (B * H and N):
        return tuple(grads)
    dq, dk, dv, dp, dc = grads
    meta = luna_meta(q, v, p)
    scratch = torch.empty(2, B * H, N, meta["BLOCK_L"], dtype=torch.float32, device=q.device)
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else inv
    common = (q, k, v, p, c, kpm, inv, dout)
    scalars = (N, p.shape[2], H, D ** -0.5)
    flags = dict(BETA_=BETA, HAS_KPM=key_padding_mask is not None, D=D, DV=v.shape[3], **meta)
    luna_bwd_dq_kernel[(B * H,)](*common, dq, scratch[0], scratch[1], *scalars, **flags)
    luna_bwd_dkv_kernel[(B * H,)](*common, scratch[0], scratch[1], dk, dv, dc, dp, *scalars, **flags)
    return dq, dk, dv, dp, dc
