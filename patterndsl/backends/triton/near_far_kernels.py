"""Triton kernels of the near field's feature products (near + far, docs/language.md §5.6): for each query row,
over its near keys (the mask's tiles, padding removed),

    A_i = sum_{j near} (phi_q_i . phi_k_j) v_j        a_i = sum_{j near} phi_q_i . phi_k_j

the part of the far totals that the exact near scores replace. A masked linear attention on the layout's tiles:
forward per query block; backward in two passes (dphi_q per query block; dphi_k, dv per key block over the heads
of its kv group, in order), so no atomics. With `d a_ij = dA_i . v_j + da_i` on allowed pairs:
`dphi_q_i = sum_j d a_ij phi_k_j`, `dphi_k_j = sum_i d a_ij phi_q_i`, `dv_j = sum_i a_ij dA_i`. Float32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _allowed(offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile: tl.constexpr, HAS_KPM: tl.constexpr):
    ok = mask_tile(offs_m[:, None], offs_n[None, :], b, N_Q, N_K, AUX) & (offs_n[None, :] < N_K)
    ok = ok & (offs_m[:, None] < N_Q)
    if HAS_KPM:
        pad = tl.load(KPM + b * N_K + offs_n, mask=offs_n < N_K, other=1)
        ok = ok & (pad == 0)[None, :]
    return ok


@triton.jit
def near_feat_fwd_kernel(PQ, PK, V, A, ASUM, ROW_PTR, COLS, KPM, AUX, N_Q, N_K, H, G, mask_tile: tl.constexpr,
                         HAS_KPM: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kvh = (b * (H // G) + (bh % H) // G).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, M)
    offs_dv = tl.arange(0, DV)
    rows = bh.to(tl.int64) * N_Q + offs_m
    pq = tl.load(PQ + rows[:, None] * M + offs_f[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    asum = tl.zeros([BLOCK_M], tl.float32)
    for t in range(tl.load(ROW_PTR + qb), tl.load(ROW_PTR + qb + 1)):
        offs_n = tl.load(COLS + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        pkt = tl.load(PK + (kvh * N_K + offs_n[None, :]) * M + offs_f[:, None], mask=offs_n[None, :] < N_K,
                      other=0.0)
        v = tl.load(V + (kvh * N_K + offs_n[:, None]) * DV + offs_dv[None, :], mask=offs_n[:, None] < N_K, other=0.0)
        ok = _allowed(offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile, HAS_KPM)
        a = tl.where(ok, tl.dot(pq, pkt, input_precision="ieee"), 0.0)
        acc += tl.dot(a, v, input_precision="ieee")
        asum += tl.sum(a, 1)
    tl.store(A + rows[:, None] * DV + offs_dv[None, :], acc, mask=offs_m[:, None] < N_Q)
    tl.store(ASUM + rows, asum, mask=offs_m < N_Q)


@triton.jit
def near_feat_dq_kernel(PQ, PK, V, DA, DASUM, DPQ, ROW_PTR, COLS, KPM, AUX, N_Q, N_K, H, G, mask_tile: tl.constexpr,
                        HAS_KPM: tl.constexpr, M: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kvh = (b * (H // G) + (bh % H) // G).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = tl.arange(0, M)
    offs_dv = tl.arange(0, DV)
    rows = bh.to(tl.int64) * N_Q + offs_m
    da = tl.load(DA + rows[:, None] * DV + offs_dv[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
    dasum = tl.load(DASUM + rows, mask=offs_m < N_Q, other=0.0)
    dpq = tl.zeros([BLOCK_M, M], tl.float32)
    for t in range(tl.load(ROW_PTR + qb), tl.load(ROW_PTR + qb + 1)):
        offs_n = tl.load(COLS + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        pk = tl.load(PK + (kvh * N_K + offs_n[:, None]) * M + offs_f[None, :], mask=offs_n[:, None] < N_K, other=0.0)
        v = tl.load(V + (kvh * N_K + offs_n[:, None]) * DV + offs_dv[None, :], mask=offs_n[:, None] < N_K, other=0.0)
        ok = _allowed(offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile, HAS_KPM)
        dscore = tl.where(ok, tl.dot(da, tl.trans(v), input_precision="ieee") + dasum[:, None], 0.0)
        dpq += tl.dot(dscore, pk, input_precision="ieee")
    tl.store(DPQ + rows[:, None] * M + offs_f[None, :], dpq, mask=offs_m[:, None] < N_Q)


@triton.jit
def near_feat_dkv_kernel(PQ, PK, V, DA, DASUM, DPK, DV_, COL_PTR, ROWS, KPM, AUX, N_Q, N_K, H, G,
                         mask_tile: tl.constexpr, HAS_KPM: tl.constexpr, M: tl.constexpr, DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kb = tl.program_id(0)
    bkv = tl.program_id(1)
    H_KV = H // G
    b = bkv // H_KV
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, M)
    offs_dv = tl.arange(0, DV)
    keys = bkv.to(tl.int64) * N_K + offs_n
    pkt = tl.load(PK + keys[None, :] * M + offs_f[:, None], mask=offs_n[None, :] < N_K, other=0.0)
    v = tl.load(V + keys[:, None] * DV + offs_dv[None, :], mask=offs_n[:, None] < N_K, other=0.0)
    dpk = tl.zeros([BLOCK_N, M], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    for g in range(0, G):                      # the query heads of this kv group, in order: no atomics
        bh = (b * H + (bkv % H_KV) * G + g).to(tl.int64)
        for t in range(tl.load(COL_PTR + kb), tl.load(COL_PTR + kb + 1)):
            offs_m = tl.load(ROWS + t) * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = bh * N_Q + offs_m
            pq = tl.load(PQ + rows[:, None] * M + offs_f[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
            da = tl.load(DA + rows[:, None] * DV + offs_dv[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
            dasum = tl.load(DASUM + rows, mask=offs_m < N_Q, other=0.0)
            ok = _allowed(offs_m, offs_n, b, N_Q, N_K, KPM, AUX, mask_tile, HAS_KPM)
            a = tl.where(ok, tl.dot(pq, pkt, input_precision="ieee"), 0.0)
            dscore = tl.where(ok, tl.dot(da, tl.trans(v), input_precision="ieee") + dasum[:, None], 0.0)
            dv += tl.dot(tl.trans(a), da, input_precision="ieee")
            dpk += tl.dot(tl.trans(dscore), pq, input_precision="ieee")
    tl.store(DPK + keys[:, None] * M + offs_f[None, :], dpk, mask=offs_n[:, None] < N_K)
    tl.store(DV_ + keys[:, None] * DV + offs_dv[None, :], dv, mask=offs_n[:, None] < N_K)
