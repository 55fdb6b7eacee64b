"""Block-sparse flash attention, backward: dq by query blocks, dk and dv by key blocks, each from recomputed
probabilities `p = exp(scale * q.k - lse)` (zero on masked pairs and on rows with lse = -inf).

With `delta_i = sum_d dout[i] * out[i]` and `ds = p * (dout . v - delta)`: `dq = scale * ds k`,
`dk = scale * ds^T q`, `dv = p^T dout`. Tiles are loaded before the full/partial branch (pipelined), as in the
forward. With GQA the dk/dv program of a kv head loops over its `GROUP` query heads in a fixed order, so the
sums are deterministic. Long key columns (global tokens) are split like long query rows in the forward;
pieces write partial sums that `softmax_sum_kernel` adds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax_fwd import _allowed, _dot, _load_rows, _tile_code, block_d, default_launch


@triton.jit
def softmax_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DQP, WORK, TILES, KPM, AUX, QOFF, sm_scale, N_Q,
                          N_QM, N_K, H, GROUP, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, mask_tile: tl.constexpr, tile_full: tl.constexpr,
                          BAND: tl.constexpr, HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr,
                          EVEN_K: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          PREC: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kvh = (bh % H) // GROUP
    qb = tl.load(WORK + w * 4)
    start = tl.load(WORK + w * 4 + 1)
    end = tl.load(WORK + w * 4 + 2)
    slot = tl.load(WORK + w * 4 + 3)
    bh64 = bh.to(tl.int64)
    b64 = b.to(tl.int64)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    i = rows[:, None]                                # rows in AUX's frame; mask_tile adds the offset AUX[0]
    if ROW_OFFSETS:
        i = i + tl.load(QOFF + b)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_q = rows < N_Q
    q = tl.load(Q + b64 * stride_qb + (bh % H).to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :], mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + bh64 * N_Q * DV + rows[:, None] * DV + offs_dv[None, :],
                 mask=in_q[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh64 * N_Q + rows, mask=in_q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh64 * N_Q + rows, mask=in_q, other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(start, end):
        kb, full = _tile_code(TILES, t, qb * BLOCK_M, 0, BAND, BLOCK_M, BLOCK_N, N_K, tile_full, True)
        j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, j, stride_kn, offs_d, N_K, D, BLOCK_D, EVEN_K, False)
        vt = _load_rows(v_base, j, stride_vn, offs_dv, N_K, DV, BLOCK_DV, EVEN_K, True)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        s = _allowed(s, i, j[None, :], b, N_QM, N_K, KPM, AUX, full, mask_tile, HAS_KPM, EVEN_K)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    dq = dq * sm_scale
    if slot < 0:
        tl.store(DQ + bh64 * N_Q * D + rows[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=in_q[:, None] & (offs_d[None, :] < D))
    else:
        part = (slot.to(tl.int64) * tl.num_programs(1) + bh) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(DQP + part[:, None] * BLOCK_D + offs_d[None, :], dq)


@triton.jit
def softmax_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, DKP, DVP, WORK, TILES, KPM, AUX, QOFF, sm_scale,
                            N_Q, N_QM, N_K, H, GROUP, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                            stride_kn, stride_vb, stride_vh, stride_vn, mask_tile: tl.constexpr,
                            tile_full: tl.constexpr, BAND: tl.constexpr, HAS_KPM: tl.constexpr,
                            ROW_OFFSETS: tl.constexpr, EVEN_K: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    w = tl.program_id(0)
    bkv = tl.program_id(1)                         # batch * H_kv + kv head
    H_KV = H // GROUP
    b = bkv // H_KV
    kvh = bkv % H_KV
    kb = tl.load(WORK + w * 4)
    start = tl.load(WORK + w * 4 + 1)
    end = tl.load(WORK + w * 4 + 2)
    slot = tl.load(WORK + w * 4 + 3)
    shift = 0                                        # rows in AUX's frame; mask_tile adds the offset AUX[0]
    if ROW_OFFSETS:
        shift = tl.load(QOFF + b)
    b64 = b.to(tl.int64)
    j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_k = j < N_K
    k = tl.load(K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + j[:, None] * stride_kn + offs_d[None, :],
                mask=in_k[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + j[:, None] * stride_vn + offs_dv[None, :],
                mask=in_k[:, None] & (offs_dv[None, :] < DV), other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):                      # the query heads sharing this kv head, in order
        bh64 = b64 * H + kvh * GROUP + g
        q_base = Q + b64 * stride_qb + (kvh * GROUP + g).to(tl.int64) * stride_qh
        for t in range(start, end):
            qb, full = _tile_code(TILES, t, 0, kb * BLOCK_N, BAND, BLOCK_M, BLOCK_N, N_K, tile_full, False)
            rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            in_q = rows < N_Q
            q = _load_rows(q_base, rows, stride_qn, offs_d, N_Q, D, BLOCK_D, False, False)
            do = _load_rows(DO + bh64 * N_Q * DV, rows, DV, offs_dv, N_Q, DV, BLOCK_DV, False, False)
            lse = tl.load(LSE + bh64 * N_Q + rows, mask=in_q, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + bh64 * N_Q + rows, mask=in_q, other=0.0)
            st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale                    # [BN, BM]
            st = _allowed(st, (shift + rows)[None, :], j[:, None], b, N_QM, N_K, KPM, AUX, full, mask_tile,
                          HAS_KPM, EVEN_K)
            pt = tl.exp2(st - lse2[None, :])
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    dk = dk * sm_scale
    bkv64 = bkv.to(tl.int64)
    if slot < 0:
        tl.store(DK + bkv64 * N_K * D + j[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=in_k[:, None] & (offs_d[None, :] < D))
        tl.store(DV_ + bkv64 * N_K * DV + j[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
                 mask=in_k[:, None] & (offs_dv[None, :] < DV))
    else:
        part = (slot.to(tl.int64) * tl.num_programs(1) + bkv) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(DKP + part[:, None] * BLOCK_D + offs_d[None, :], dk)
        tl.store(DVP + part[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def softmax_sum_kernel(G, P, GROUPS, GROUP_BLOCK, WIDTH, N, D: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Program (g, bh): the partial gradients of split block `GROUP_BLOCK[g]` added in slot order into G."""
    g = tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    rows = tl.load(GROUP_BLOCK + g).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for s in range(0, WIDTH):
        slot = tl.load(GROUPS + g * WIDTH + s)
        if slot >= 0:
            part = (slot.to(tl.int64) * n_bh + bh) * BLOCK
            acc += tl.load(P + (part + offs)[:, None] * BLOCK_D + offs_d[None, :])
    tl.store(G + bh.to(tl.int64) * N * D + rows[:, None] * D + offs_d[None, :], acc.to(G.dtype.element_ty),
             mask=(rows[:, None] < N) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------- launcher
def softmax_bwd(do, q, k, v, out, lse, plan, mod, scale: float, key_padding_mask, aux, offsets=None,
                opts: dict | None = None, dlse=None):
    """Gradients (dq, dk, dv) of the forward, contiguous; q, k, v, out as in `softmax_fwd`, `do` contiguous,
    `opts` the launch options of the dq ("fwd") and dk/dv ("dkdv") kernels,
    lse `[B, H, N_q]`; `dlse` (the gradient of lse, optional) enters as `delta -= dlse` since
    `d lse_i / d s_ij = p_ij`."""
    offsets, opts = default_launch(q, offsets, opts)
    B, H, NQ, D = q.shape
    HKV, NK, DV = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H == 0:
        return dq, dk, dv
    BM, BN, BD, BDV = plan.block_m, plan.block_n, block_d(D), block_d(DV)
    delta = (do.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else aux
    common = dict(mask_tile=mod.mask_tile, tile_full=mod.tile_full, BAND=plan.band,
                  HAS_KPM=key_padding_mask is not None, ROW_OFFSETS=offsets.per_row, EVEN_K=NK % BN == 0, D=D,
                  DV=DV, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_DV=BDV)
    scalars = (offsets.tensor(aux), scale, NQ, offsets.extent(NQ), NK, H, H // HKV,
               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    f32 = dict(dtype=torch.float32, device=q.device)
    if NQ:
        rows = plan.rows
        dqp = torch.empty(max(rows.slots, 1), B * H, BM, BD, **f32)
        softmax_bwd_dq_kernel[(rows.work.shape[0], B * H)](
            q, k, v, do, lse, delta, dq, dqp, rows.work, rows.tiles, kpm, aux, *scalars, **common, **opts["fwd"])
        if rows.slots:
            _sum(dq, dqp, rows, BM, B * H)
    if NK:
        cols = plan.cols
        dkp = torch.empty(max(cols.slots, 1), B * HKV, BN, BD, **f32)
        dvp = torch.empty(max(cols.slots, 1), B * HKV, BN, BDV, **f32)
        softmax_bwd_dkdv_kernel[(cols.work.shape[0], B * HKV)](
            q, k, v, do, lse, delta, dk, dv, dkp, dvp, cols.work, cols.tiles, kpm, aux, *scalars, **common,
            **opts["dkdv"])
        if cols.slots:
            _sum(dk, dkp, cols, BN, B * HKV)
            _sum(dv, dvp, cols, BN, B * HKV)
    return dq, dk, dv


def _sum(grad, parts, work, block: int, programs: int) -> None:
    N, D = grad.shape[2], grad.shape[3]
    softmax_sum_kernel[(work.group_block.shape[0], programs)](
        grad, parts, work.groups, work.group_block, work.groups.shape[1], N, D=D, BLOCK=block,
        BLOCK_D=parts.shape[3], num_warps=4)
