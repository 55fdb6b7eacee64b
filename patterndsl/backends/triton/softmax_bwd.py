"""Block-sparse flash attention, backward: dq by query blocks, dk and dv by key blocks, each from recomputed
probabilities `p = exp(scale * q.k - lse)` (zero on masked pairs and on rows with lse = -inf).

With `delta_i = sum_d dout[i] * out[i]` and `ds = p * (dout . v - delta)`: `dq = scale * ds k`,
`dk = scale * ds^T q`, `dv = p^T dout`. Long key columns (global tokens) are split like long query rows in
the forward; pieces write partial sums that `sum_groups` adds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax_fwd import _dot, _tile_code, block_d, kernel_options


@triton.jit
def _keep(s, offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile: tl.constexpr, MASKED: tl.constexpr,
          HAS_KPM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Scores with disallowed pairs set to -inf; `s` is [BM, BN] (or [BN, BM] when TRANSPOSED)."""
    if TRANSPOSED:
        i = offs_m[None, :]
        j = offs_n[:, None]
    else:
        i = offs_m[:, None]
        j = offs_n[None, :]
    if MASKED:
        ok = mask_tile(i, j, b, N_Q, N_K, AUX) & (j < N_K)
        if HAS_KPM:
            pad = tl.load(KPM + b * N_K + offs_n, mask=offs_n < N_K, other=1)
            if TRANSPOSED:
                ok = ok & (pad == 0)[:, None]
            else:
                ok = ok & (pad == 0)[None, :]
        s = tl.where(ok, s, float("-inf"))
    elif HAS_KPM:
        pad = tl.load(KPM + b * N_K + offs_n)
        if TRANSPOSED:
            s = tl.where((pad == 0)[:, None], s, float("-inf"))
        else:
            s = tl.where((pad == 0)[None, :], s, float("-inf"))
    return s


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, offs_m, n0, b, N_Q, N_K, qk_scale, KPM, AUX,
             stride_kn, stride_vn, mask_tile: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    vt_ptrs = v_base + offs_n[None, :] * stride_vn + offs_dv[:, None]
    if MASKED:
        k = tl.load(k_ptrs, mask=(offs_n[:, None] < N_K) & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(vt_ptrs, mask=(offs_n[None, :] < N_K) & (offs_dv[:, None] < DV), other=0.0)
    else:
        if BLOCK_D == D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        if BLOCK_DV == DV:
            vt = tl.load(vt_ptrs)
        else:
            vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < DV, other=0.0)
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    s = _keep(s, offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile, MASKED, HAS_KPM, False)
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, vt, PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PREC, UPCAST)


@triton.jit
def softmax_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DQP, WORK, TILES, KPM, AUX, sm_scale, N_Q, N_K, H,
                          stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn,
                          mask_tile: tl.constexpr, tile_full: tl.constexpr, BAND: tl.constexpr,
                          HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          PREC: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    qb = tl.load(WORK + w * 4)
    start = tl.load(WORK + w * 4 + 1)
    end = tl.load(WORK + w * 4 + 2)
    slot = tl.load(WORK + w * 4 + 3)
    bh64 = bh.to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = offs_m < N_Q
    q = tl.load(Q + bh64 * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + bh64 * N_Q * DV + offs_m[:, None] * DV + offs_dv[None, :],
                 mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh64 * N_Q + offs_m, mask=in_q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh64 * N_Q + offs_m, mask=in_q, other=0.0)
    k_base = K + bh64 * stride_kh
    v_base = V + bh64 * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(start, end):
        kb, full = _tile_code(TILES, t, qb, BAND, BLOCK_M, BLOCK_N, N_K, tile_full, True)
        if full:
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, offs_m, kb * BLOCK_N, b, N_Q, N_K, qk_scale,
                          KPM, AUX, stride_kn, stride_vn, mask_tile, False, HAS_KPM, D, DV, BLOCK_N, BLOCK_D,
                          BLOCK_DV, PREC, UPCAST)
        else:
            dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, offs_m, kb * BLOCK_N, b, N_Q, N_K, qk_scale,
                          KPM, AUX, stride_kn, stride_vn, mask_tile, True, HAS_KPM, D, DV, BLOCK_N, BLOCK_D,
                          BLOCK_DV, PREC, UPCAST)
    dq = dq * sm_scale
    if slot < 0:
        tl.store(DQ + bh64 * N_Q * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=in_q[:, None] & (offs_d[None, :] < D))
    else:
        rows = (slot.to(tl.int64) * tl.num_programs(1) + bh) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(DQP + rows[:, None] * BLOCK_D + offs_d[None, :], dq)


@triton.jit
def softmax_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, DKP, DVP, WORK, TILES, KPM, AUX, sm_scale,
                            N_Q, N_K, H, stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn,
                            mask_tile: tl.constexpr, tile_full: tl.constexpr, BAND: tl.constexpr,
                            HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            PREC: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kb = tl.load(WORK + w * 4)
    start = tl.load(WORK + w * 4 + 1)
    end = tl.load(WORK + w * 4 + 2)
    slot = tl.load(WORK + w * 4 + 3)
    bh64 = bh.to(tl.int64)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_k = offs_n < N_K
    k = tl.load(K + bh64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=in_k[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + bh64 * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=in_k[:, None] & (offs_dv[None, :] < DV), other=0.0)
    q_base = Q + bh64 * stride_qh
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for t in range(start, end):
        qb, full = _tile_code(TILES, t, kb, BAND, BLOCK_M, BLOCK_N, N_K, tile_full, False)
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        in_q = offs_m < N_Q
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + bh64 * N_Q * DV + offs_m[:, None] * DV + offs_dv[None, :],
                     mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + bh64 * N_Q + offs_m, mask=in_q, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + bh64 * N_Q + offs_m, mask=in_q, other=0.0)
        st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale                    # [BN, BM]
        if full:
            st = _keep(st, offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile, False, HAS_KPM, True)
        else:
            st = _keep(st, offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile, True, HAS_KPM, True)
        pt = tl.exp2(st - lse2[None, :])
        dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    dk = dk * sm_scale
    if slot < 0:
        tl.store(DK + bh64 * N_K * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=in_k[:, None] & (offs_d[None, :] < D))
        tl.store(DV_ + bh64 * N_K * DV + offs_n[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=in_k[:, None] & (offs_dv[None, :] < DV))
    else:
        rows = (slot.to(tl.int64) * tl.num_programs(1) + bh) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(DKP + rows[:, None] * BLOCK_D + offs_d[None, :], dk)
        tl.store(DVP + rows[:, None] * BLOCK_DV + offs_dv[None, :], dv)


# ----------------------------------------------------------------------------------------------- launcher
def softmax_bwd(do, q, k, v, out, lse, plan, mod, scale: float, key_padding_mask, aux, dlse=None,
                num_warps: int = 4):
    """Gradients (dq, dk, dv) of the forward; all tensors contiguous `[B, H, N, D]`, lse `[B, H, N_q]`;
    `dlse` (the gradient of lse, optional) enters as `delta -= dlse` since `d lse_i / d s_ij = p_ij`."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H == 0:
        return dq, dk, dv
    BM, BN, BD, BDV = plan.block_m, plan.block_n, block_d(D), block_d(DV)
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else aux
    common = dict(mask_tile=mod.mask_tile, tile_full=mod.tile_full, BAND=plan.band,
                  HAS_KPM=key_padding_mask is not None, D=D, DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                  BLOCK_DV=BDV, num_warps=num_warps, **kernel_options(q.dtype, q.device))
    strides = (q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2))
    f32 = dict(dtype=torch.float32, device=q.device)
    if NQ:
        rows = plan.rows
        dqp = torch.empty(max(rows.slots, 1), B * H, BM, BD, **f32)
        softmax_bwd_dq_kernel[(rows.work.shape[0], B * H)](
            q, k, v, do, lse, delta, dq, dqp, rows.work, rows.tiles, kpm, aux, scale, NQ, NK, H, *strides,
            **common)
        if rows.slots:
            sum_groups(dq, dqp, rows, BM)
    if NK:
        cols = plan.cols
        dkp = torch.empty(max(cols.slots, 1), B * H, BN, BD, **f32)
        dvp = torch.empty(max(cols.slots, 1), B * H, BN, BDV, **f32)
        softmax_bwd_dkdv_kernel[(cols.work.shape[0], B * H)](
            q, k, v, do, lse, delta, dk, dv, dkp, dvp, cols.work, cols.tiles, kpm, aux, scale, NQ, NK, H,
            *strides, **common)
        if cols.slots:
            sum_groups(dk, dkp, cols, BN)
            sum_groups(dv, dvp, cols, BN)
    return dq, dk, dv


def sum_groups(grad, parts, work, block: int) -> None:
    """Add the partial gradients of each split block and write them into `grad` `[B, H, N, D]` in place."""
    B, H, N, D = grad.shape
    g = work.groups
    used = (g >= 0)[:, :, None, None, None]
    total = torch.where(used, parts[g.clamp(min=0)], 0.0).sum(1)          # [G, BH, block, BD]
    idx = work.group_block[:, None] * block + torch.arange(block, device=grad.device)
    valid = idx < N
    grad.view(B * H, N, D)[:, idx[valid]] = total.permute(1, 0, 2, 3)[:, valid][..., :D].to(grad.dtype)
