"""Triton kernels of softmax with pointwise score terms (bias, learned tables, soft cap): forward, and a
backward in two passes (dq per query block; dk, dv per key block over the heads of its kv group), so no
atomics. The dq pass also sums the weights of each table read per bucket (`table_grad_tile`, scores.py) into
its own row of a partials buffer `[query blocks, B * H, SITES, NB]`, which torch sums in a fixed order: the
tables' gradient is deterministic. Tiles come from the mask's sparse layout (`row_ptr`, `cols`: CSR, and its transpose); partial and
full tiles alike evaluate the generated `mask_tile` (codegen.py) and `score_tile` (scores.py). Scores in
float32, natural base.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scores(q, kt, offs_m, offs_n, b, h, N_Q, N_K, Q_OFFSET, sm_scale, KPM, AUX, T0, T1, W0, W1,
            mask_tile: tl.constexpr, score_tile: tl.constexpr, HAS_KPM: tl.constexpr):
    """(final scores with -inf where not allowed, allowed) of one tile."""
    s = tl.dot(q, kt, input_precision="ieee") * sm_scale
    s = score_tile(s, offs_m[:, None] + Q_OFFSET, offs_n[None, :], h, T0, T1, W0, W1)
    ok = mask_tile(offs_m[:, None], offs_n[None, :], b, N_Q, N_K, AUX) & (offs_n[None, :] < N_K)
    ok = ok & (offs_m[:, None] < N_Q)
    if HAS_KPM:
        pad = tl.load(KPM + b * N_K + offs_n, mask=offs_n < N_K, other=1)
        ok = ok & (pad == 0)[None, :]
    return tl.where(ok, s, float("-inf")), ok


@triton.jit
def scored_fwd_kernel(Q, K, V, O, LSE, ROW_PTR, COLS, KPM, AUX, T0, T1, W0, W1, sm_scale, N_Q, N_K, H, G,
                      HEAD0, Q_OFFSET, mask_tile: tl.constexpr, score_tile: tl.constexpr, HAS_KPM: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = (b * (H // G) + h // G).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(Q + (bh.to(tl.int64) * N_Q + offs_m[:, None]) * D + offs_d[None, :], mask=offs_m[:, None] < N_Q,
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for t in range(tl.load(ROW_PTR + qb), tl.load(ROW_PTR + qb + 1)):
        offs_n = tl.load(COLS + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(K + (kvh * N_K + offs_n[None, :]) * D + offs_d[:, None], mask=offs_n[None, :] < N_K, other=0.0)
        v = tl.load(V + (kvh * N_K + offs_n[:, None]) * DV + offs_dv[None, :], mask=offs_n[:, None] < N_K, other=0.0)
        s, ok = _scores(q, kt, offs_m, offs_n, b, h + HEAD0, N_Q, N_K, Q_OFFSET, sm_scale, KPM, AUX, T0, T1, W0,
                        W1, mask_tile, score_tile, HAS_KPM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + (bh.to(tl.int64) * N_Q + offs_m[:, None]) * DV + offs_dv[None, :], acc / l_safe[:, None],
             mask=offs_m[:, None] < N_Q)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _grad_scores(q, kt, v, do, lse, delta, offs_m, offs_n, b, h, N_Q, N_K, Q_OFFSET, sm_scale,
                 CAP: tl.constexpr, KPM, AUX, T0, T1, W0, W1, mask_tile: tl.constexpr, score_tile: tl.constexpr,
                 HAS_KPM: tl.constexpr):
    """(p, d of the score after the bias) of one tile: the soft cap's derivative is 1 - (s / cap)^2."""
    s, ok = _scores(q, kt, offs_m, offs_n, b, h, N_Q, N_K, Q_OFFSET, sm_scale, KPM, AUX, T0, T1, W0, W1, mask_tile,
                    score_tile, HAS_KPM)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.where(ok, tl.exp(s - lse_safe[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    if CAP > 0:
        capped = tl.where(ok, s / CAP, 0.0)
        ds = ds * (1.0 - capped * capped)
    return p, ds


@triton.jit
def _bucket_sums(acc, w, bucket, NB: tl.constexpr):
    """acc[b] += the sum of `w` over the pairs in bucket b, for the buckets of the tile's nonzero weights (a
    far tile usually has one; a loop over them, no scatter)."""
    lo = tl.min(tl.min(tl.where(w != 0.0, bucket, NB), 1), 0)
    hi = tl.max(tl.max(tl.where(w != 0.0, bucket, -1), 1), 0)
    slots = tl.arange(0, NB)
    for k in range(lo, hi + 1):
        acc = tl.where(slots == k, acc + tl.sum(tl.sum(tl.where(bucket == k, w, 0.0), 1), 0), acc)
    return acc


@triton.jit
def scored_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PART, ROW_PTR, COLS, KPM, AUX, T0, T1, W0, W1, sm_scale,
                     CAP: tl.constexpr, N_Q, N_K, H, G, HEAD0, Q_OFFSET, mask_tile: tl.constexpr,
                     score_tile: tl.constexpr, table_grad: tl.constexpr, SITES: tl.constexpr, NB: tl.constexpr,
                     HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = (b * (H // G) + h // G).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    rows = bh.to(tl.int64) * N_Q + offs_m
    q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
    do = tl.load(DO + rows[:, None] * DV + offs_dv[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
    lse = tl.load(LSE + rows, mask=offs_m < N_Q, other=float("-inf"))
    delta = tl.load(DELTA + rows, mask=offs_m < N_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    acc0 = tl.zeros([NB], tl.float32)
    acc1 = tl.zeros([NB], tl.float32)
    for t in range(tl.load(ROW_PTR + qb), tl.load(ROW_PTR + qb + 1)):
        offs_n = tl.load(COLS + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(K + (kvh * N_K + offs_n[None, :]) * D + offs_d[:, None], mask=offs_n[None, :] < N_K, other=0.0)
        v = tl.load(V + (kvh * N_K + offs_n[:, None]) * DV + offs_dv[None, :], mask=offs_n[:, None] < N_K, other=0.0)
        _, ds = _grad_scores(q, kt, v, do, lse, delta, offs_m, offs_n, b, h + HEAD0, N_Q, N_K, Q_OFFSET, sm_scale,
                             CAP, KPM, AUX, T0, T1, W0, W1, mask_tile, score_tile, HAS_KPM)
        dq += tl.dot(ds, tl.trans(kt), input_precision="ieee")
        if SITES > 0:
            w0, b0, w1, b1 = table_grad(ds, offs_m[:, None] + Q_OFFSET, offs_n[None, :], h + HEAD0, T0, T1, W0, W1)
            acc0 = _bucket_sums(acc0, w0, b0, NB)
            if SITES > 1:
                acc1 = _bucket_sums(acc1, w1, b1, NB)
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], dq * sm_scale, mask=offs_m[:, None] < N_Q)
    if SITES > 0:                                       # this program's row of the partials: no atomics
        part = PART + ((qb * tl.num_programs(1) + bh).to(tl.int64) * SITES) * NB + tl.arange(0, NB)
        tl.store(part, acc0)
        if SITES > 1:
            tl.store(part + NB, acc1)


@triton.jit
def scored_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, COL_PTR, ROWS, KPM, AUX, T0, T1, W0, W1, sm_scale,
                      CAP: tl.constexpr, N_Q, N_K, H, G, HEAD0, Q_OFFSET, mask_tile: tl.constexpr, score_tile: tl.constexpr, HAS_KPM: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kb = tl.program_id(0)
    bkv = tl.program_id(1)
    H_KV = H // G
    b = bkv // H_KV
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    keys = bkv.to(tl.int64) * N_K + offs_n
    kt = tl.load(K + keys[None, :] * D + offs_d[:, None], mask=offs_n[None, :] < N_K, other=0.0)
    v = tl.load(V + keys[:, None] * DV + offs_dv[None, :], mask=offs_n[:, None] < N_K, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    for g in range(0, G):                      # the query heads of this kv group, in order: no atomics
        h = (bkv % H_KV) * G + g
        bh = (b * H + h).to(tl.int64)
        for t in range(tl.load(COL_PTR + kb), tl.load(COL_PTR + kb + 1)):
            offs_m = tl.load(ROWS + t) * BLOCK_M + tl.arange(0, BLOCK_M)
            rows = bh * N_Q + offs_m
            q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
            do = tl.load(DO + rows[:, None] * DV + offs_dv[None, :], mask=offs_m[:, None] < N_Q, other=0.0)
            lse = tl.load(LSE + rows, mask=offs_m < N_Q, other=float("-inf"))
            delta = tl.load(DELTA + rows, mask=offs_m < N_Q, other=0.0)
            p, ds = _grad_scores(q, kt, v, do, lse, delta, offs_m, offs_n, b, h + HEAD0, N_Q, N_K, Q_OFFSET,
                                 sm_scale, CAP, KPM, AUX, T0, T1, W0, W1, mask_tile, score_tile, HAS_KPM)
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(DK + keys[:, None] * D + offs_d[None, :], dk * sm_scale, mask=offs_n[:, None] < N_K)
    tl.store(DV_ + keys[:, None] * DV + offs_dv[None, :], dv, mask=offs_n[:, None] < N_K)
