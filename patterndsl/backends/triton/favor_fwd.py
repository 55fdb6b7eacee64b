"""Linear attention with the feature map fused in (FAVOR+, relu features, elu+1), forward.

With `x' = x * scale_x` and `u = x' W^T` (a feature block of `W [m, D]` at a time), the features are
FAVOR+: `phi_q = exp(u - |x'|^2/2 - cq) + eps` (`cq` the query's max over its `u`) and, for key `j` seen from
query `t`, `phi_k = exp(u_j - h_j - ck_t) + eps = exp(ck_j - ck_t) P_j + eps` with `P_j = exp(u_j - h_j - ck_j)
<= 1`; relu: `phi = relu(u) + 1e-3`; elu+1: `phi = elu(x) + 1` (W = I). The common factor m^-1/2 cancels.

    num_t = sum_j w_tj v_j,  den_t = sum_j w_tj,  w_tj = exp(ck_j - ck_t) phi_q(t).P_j + EPS_K sum_f phi_q(t)

over valid keys `j` (all of them, or `j <= t` when causal; `EPS_K` = eps for FAVOR+, 0 otherwise). `ck` is a
constant (non-causal) or a running max over keys (causal), so no query sees a future key. One program per
(batch-head, feature block) scans the sequence in chunks of BLOCK_T tokens with the state
`S = sum_j exp(ck_j - c) P_j^T v_j` (and `z`, the sums of v and of valid keys) rescaled as `c` grows; its
partial num/den are summed over feature blocks by the launcher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FAVOR, RELU, ELU1 = 0, 1, 2


@triton.jit
def _features(x, wt, c, KIND: tl.constexpr, EPS_Q, PREC: tl.constexpr):
    """(phi, dphi/du) of a chunk: x [BT, BD] (scaled), wt [BD, BF] (W^T block), c [BT] stabilisers."""
    u = tl.dot(x, wt, input_precision=PREC)
    if KIND == 0:
        h = tl.sum(x * x, 1) * 0.5
        e = tl.exp(u - h[:, None] - c[:, None])
        return e + EPS_Q, e
    elif KIND == 1:
        return tl.maximum(u, 0.0) + EPS_Q, (u > 0).to(tl.float32)
    else:
        e = tl.exp(tl.minimum(u, 0.0))
        return tl.where(u > 0, u + 1.0, e), tl.where(u > 0, 1.0, e)


@triton.jit
def _chunk(X, base, t, in_t, scale_x, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X + base + t[:, None] * D + offs_d[None, :], mask=in_t[:, None] & (offs_d[None, :] < D), other=0.0)
    return x.to(tl.float32) * scale_x


@triton.jit
def _keys(K, V, CK, KPM, bh, b, t, in_t, fmask, wt, scale_x, N, KIND: tl.constexpr, EPS_R, HAS_KPM: tl.constexpr,
          D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Key features P [BT, BF] (zero on padded keys), values [BT, BDV], stabilisers, validity, u-derivative."""
    bh64 = bh.to(tl.int64)
    kx = _chunk(K, bh64 * N * D, t, in_t, scale_x, D, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    v = tl.load(V + bh64 * N * DV + t[:, None] * DV + offs_dv[None, :],
                mask=in_t[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
    ck = tl.load(CK + bh64 * N + t, mask=in_t, other=0.0)
    valid = in_t
    if HAS_KPM:
        valid = valid & (tl.load(KPM + b * N + t, mask=in_t, other=1) == 0)
    p, dp = _features(kx, wt, ck, KIND, EPS_R, PREC)
    keep = valid[:, None] & fmask[None, :]
    return tl.where(keep, p, 0.0), tl.where(keep, dp, 0.0), kx, v, ck, valid


@triton.jit
def _queries(Q, CQ, bh, t, in_t, fmask, wt, scale_x, N, KIND: tl.constexpr, EPS_Q, D: tl.constexpr,
             BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Query features phi [BT, BF] (zero outside the sequence and the features), their u-derivative, x'."""
    bh64 = bh.to(tl.int64)
    qx = _chunk(Q, bh64 * N * D, t, in_t, scale_x, D, BLOCK_D)
    cq = tl.load(CQ + bh64 * N + t, mask=in_t, other=0.0)
    phi, dphi = _features(qx, wt, cq, KIND, EPS_Q, PREC)
    keep = in_t[:, None] & fmask[None, :]
    return tl.where(keep, phi, 0.0), tl.where(keep, dphi, 0.0), qx


@triton.jit
def _weight_tile(ck_row, ck_col, in_row, valid_col, row_idx, col_idx):
    """exp(ck_col - ck_row) where col <= row (both real), else 0: the causal decay between two chunks' tokens."""
    ok = (col_idx[None, :] <= row_idx[:, None]) & in_row[:, None] & valid_col[None, :]
    return tl.where(ok, tl.exp(tl.where(ok, ck_col[None, :] - ck_row[:, None], 0.0)), 0.0), ok


@triton.jit
def favor_fwd_kernel(Q, K, V, W, CQ, CK, KPM, NUM, DEN, NQ, NK, M, H, scale_x, EPS_Q, EPS_R, EPS_K,
                     KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr,
                     DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    fb = tl.program_id(1)
    b = bh // H
    f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = f < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    wt = tl.load(W + f[None, :] * D + offs_d[:, None], mask=fmask[None, :] & (offs_d[:, None] < D),
                 other=0.0).to(tl.float32)
    S = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    vs = tl.zeros([BLOCK_DV], tl.float32)
    ns = 0.0
    c_prev = tl.load(CK + bh.to(tl.int64) * NK)
    if not CAUSAL:   # the state over every key first (ck is one constant)
        for t0 in range(0, NK, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            p, _, _, v, _, valid = _keys(K, V, CK, KPM, bh, b, t, t < NK, fmask, wt, scale_x, NK, KIND, EPS_R,
                                         HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
            S += tl.dot(tl.trans(p), v, input_precision=PREC)
            z += tl.sum(p, 0)
            vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
            ns += tl.sum(valid.to(tl.float32), 0)
    for t0 in range(0, NQ, BLOCK_T):   # causal: NQ == NK
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < NQ
        phi, _, _ = _queries(Q, CQ, bh, t, in_t, fmask, wt, scale_x, NQ, KIND, EPS_Q, D, BLOCK_D, PREC)
        sphi = tl.sum(phi, 1)
        if CAUSAL:
            p, _, _, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, in_t, fmask, wt, scale_x, NK, KIND, EPS_R,
                                          HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
            sc = tl.where(in_t, tl.exp(tl.where(in_t, c_prev - ck, 0.0)), 0.0)
            num = sc[:, None] * tl.dot(phi, S, input_precision=PREC) + EPS_K * sphi[:, None] * vs[None, :]
            den = sc * tl.sum(phi * z[None, :], 1) + EPS_K * sphi * ns
            decay, ok = _weight_tile(ck, ck, in_t, valid, t, t)
            a = tl.dot(phi, tl.trans(p), input_precision=PREC) * decay + tl.where(ok, EPS_K * sphi[:, None], 0.0)
            num += tl.dot(a, v, input_precision=PREC)
            den += tl.sum(a, 1)
            c_end = tl.max(tl.where(in_t, ck, float("-inf")), 0)
            pe = p * tl.where(valid, tl.exp(tl.where(valid, ck - c_end, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_prev - c_end)
            S = S * rescale + tl.dot(tl.trans(pe), v, input_precision=PREC)
            z = z * rescale + tl.sum(pe, 0)
            vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
            ns += tl.sum(valid.to(tl.float32), 0)
            c_prev = c_end
        else:
            num = tl.dot(phi, S, input_precision=PREC) + EPS_K * sphi[:, None] * vs[None, :]
            den = tl.sum(phi * z[None, :], 1) + EPS_K * sphi * ns
        rows = (fb * tl.num_programs(0) + bh).to(tl.int64) * NQ + t
        tl.store(NUM + rows[:, None] * BLOCK_DV + offs_dv[None, :], num, mask=in_t[:, None])
        tl.store(DEN + rows, den, mask=in_t)


@triton.jit
def favor_stats_kernel(X, W, OUT, ARG, N, M, scale_x, D: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """OUT[bh, t] = max_f (x'_t W^T)_f, the FAVOR+ stabiliser of each token, and ARG its feature f."""
    bh = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < N
    offs_d = tl.arange(0, BLOCK_D)
    x = _chunk(X, bh.to(tl.int64) * N * D, t, in_t, scale_x, D, BLOCK_D)
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_T], tl.int32)
    for f0 in range(0, M, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        wt = tl.load(W + f[None, :] * D + offs_d[:, None], mask=(f[None, :] < M) & (offs_d[:, None] < D),
                     other=0.0).to(tl.float32)
        u = tl.where((f < M)[None, :], tl.dot(x, wt, input_precision=PREC), float("-inf"))
        top = tl.max(u, 1)
        arg = tl.where(top > best, f0 + tl.argmax(u, 1).to(tl.int32), arg)
        best = tl.maximum(best, top)
    tl.store(OUT + bh.to(tl.int64) * N + t, best, mask=in_t)
    tl.store(ARG + bh.to(tl.int64) * N + t, arg, mask=in_t)


# ---------------------------------------------------------------------------------------------- launchers
def blocks(n: int, m: int, device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_F): tokens per chunk, features per program."""
    cap = 32 if device.type == "cpu" else 64
    return min(cap, max(16, triton.next_power_of_2(n))), min(cap, max(16, triton.next_power_of_2(m)))


def precision(dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def favor_stats(x, w, scale_x: float):
    """(max, argmax) over features of `x' W^T` per token: float32 and int64 `[B, H, N]`."""
    B, H, N, D = x.shape
    out = torch.empty(B, H, N, dtype=torch.float32, device=x.device)
    arg = torch.zeros(B, H, N, dtype=torch.int32, device=x.device)
    bt, bf = blocks(N, w.shape[0], x.device)
    if N and B * H:
        favor_stats_kernel[(B * H, triton.cdiv(N, bt))](x, w, out, arg, N, w.shape[0], scale_x, D=D, BLOCK_T=bt,
                                                        BLOCK_F=bf, BLOCK_D=max(16, triton.next_power_of_2(D)),
                                                        PREC=precision(x.dtype))
    return out, arg.long()


def favor_fwd(q, k, v, w, cq, ck, kpm, kind: int, causal: bool, eps: float, scale_x: float):
    """(num `[B, H, N_q, D_v]`, den `[B, H, N_q]`) float32, summed over feature blocks. Tensors contiguous;
    causal needs N_q == N_k."""
    B, H, N, D = q.shape
    NK, DV, M = k.shape[2], v.shape[3], w.shape[0]
    bt, bf = blocks(max(N, NK), M, q.device)
    nf = triton.cdiv(M, bf)
    bdv = max(16, triton.next_power_of_2(DV))
    num = torch.zeros(nf, B * H, N, bdv, dtype=torch.float32, device=q.device)
    den = torch.zeros(nf, B * H, N, dtype=torch.float32, device=q.device)
    if N and NK and B * H:
        favor_fwd_kernel[(B * H, nf)](
            q, k, v, w, cq, ck, kpm if kpm is not None else cq, num, den, N, NK, M, H, scale_x, *eps_values(kind, eps),
            KIND=kind, CAUSAL=causal, HAS_KPM=kpm is not None, D=D, DV=DV, BLOCK_T=bt, BLOCK_F=bf,
            BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=bdv, PREC=precision(q.dtype))
    return num.sum(0)[..., :DV].reshape(B, H, N, DV), den.sum(0).reshape(B, H, N)


def eps_values(kind: int, eps: float) -> tuple[float, float, float]:
    """(EPS_Q added to query features, EPS_R added to key features, EPS_K the key eps kept out of the decay)."""
    if kind == FAVOR:
        return eps, 0.0, eps
    if kind == RELU:
        return eps, eps, 0.0
    return 0.0, 0.0, 0.0
