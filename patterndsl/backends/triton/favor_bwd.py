"""Linear attention with fused feature maps, backward (the forward's notation, chunks and segments: favor_fwd.py).

With `g_t = dout_t / den_t` and `gd_t = -(dout_t . out_t) / den_t`, each weight `w_tj` receives
`G_tj = v_j . g_t + gd_t`. Then `dphi_q(t) = sum_j exp(ck_j - ck_t) P_j G_tj + EPS_K sum_j G_tj` (from the
forward's states, one program per chunk of queries), `dv_j = sum_t w_tj g_t` and `dP_j = sum_t exp(ck_j - ck_t)
phi_q(t) G_tj` (one program per chunk of keys, from the state of the later queries `R = sum_t exp(c - ck_t)
phi_q(t)^T g_t`, with `r`, the same with `gd`, and `sg = sum_t sphi_t g_t`: `favor_rstate_kernel` walks each
segment backward storing every chunk's segment-local part and the segment's total; the launcher adds the later
segments). Feature gradients go back through `u = x' W^T` (and `|x'|^2 / 2` for FAVOR+) with the stabilisers
held constant, as in performer-pytorch's `.detach()`. Every program loops over the feature blocks, so dq, dk,
dv come out summed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .favor_fwd import _features_of, _key_rows, _matrix, _put, _rows, _slope, _weight_tile, _wt, eps_values, launch


@triton.jit
def _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV: tl.constexpr):
    rows = bh.to(tl.int64) * NQ + r
    g = tl.load(GN + rows[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], mask=in_q[:, None], other=0.0)
    return g, tl.load(GD + rows, mask=in_q, other=0.0)


@triton.jit
def _to_x(dx, sda, x, KIND: tl.constexpr, scale_x):
    """The gradient wrt the unscaled input rows `x` of a chunk, from `dx = sum_f dL/du W` and the row sums
    `sda = sum_f dL/du` over every feature block (plus the |x'|^2/2 term for FAVOR+); applied once after the
    feature loop, so x' is not kept alive inside it."""
    if KIND == 0:
        dx -= sda[:, None] * (x.to(tl.float32) * scale_x)
    return dx * scale_x


@triton.jit(do_not_specialize=["q_off"])
def favor_rstate_kernel(Q, W, CQ, CK, GN, GD, QOFF, RS, RR, RG, R, RRT, RGT, q_off, NQ, P, M, H, SEG, scale_x, EPS_Q,
                        KIND: tl.constexpr, CAUSAL: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, fb, s): the queries of segment s walked backward from a zero state. Causal: before each chunk c
    the running local state (of the later queries in the segment) goes to RS/RR/RG[c], relative to ck at the next
    chunk's first position; at the end the segment's total goes to R/RRT/RGT[s] (relative to ck at its first
    position)."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_bh, nf = tl.num_programs(0), tl.num_programs(1)
    bh64 = bh.to(tl.int64)
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + bh // H)
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo = s * SEG
    hi = tl.minimum(lo + SEG, P)
    if CAUSAL:
        c_ref = tl.load(CK + bh64 * P + tl.minimum(hi, P - 1))
    Rt = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    rr = tl.zeros([BLOCK_F], tl.float32)
    sg = tl.zeros([BLOCK_DV], tl.float32)
    n_chunks = tl.cdiv(hi - lo, BLOCK_T)
    for i in range(0, n_chunks):
        t0 = lo + (n_chunks - 1 - i) * BLOCK_T                         # last chunk first
        if CAUSAL:
            row = (bh + (t0 // BLOCK_T) * n_bh).to(tl.int64) * nf + fb
            _put(RS, row, Rt, BLOCK_F, BLOCK_DV)
            _put(RR, row, rr, BLOCK_F, 1)
            _put(RG, row, sg, BLOCK_DV, 1)
        t = t0 + tl.arange(0, BLOCK_T)
        r = t - q_off
        in_q = (r >= 0) & (r < NQ) & (t < hi)
        qx = _rows(Q + bh64 * NQ * D, r, in_q, D, BLOCK_D)
        cq = tl.load(CQ + bh64 * NQ + r, mask=in_q, other=0.0)
        phi = _features_of(qx, in_q, cq, fmask, wt, scale_x, KIND, EPS_Q, PREC)
        g, gd = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
        sg += tl.sum(tl.sum(phi, 1)[:, None] * g, 0)
        if CAUSAL:
            c_new = tl.load(CK + bh64 * P + t0)
            ckq = tl.load(CK + bh64 * P + t, mask=in_q, other=0.0)
            phi = phi * tl.where(in_q, tl.exp(tl.where(in_q, c_new - ckq, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_new - c_ref)
            Rt = Rt * rescale
            rr = rr * rescale
            c_ref = c_new
        Rt += tl.dot(tl.trans(phi), g, input_precision=PREC)
        rr += tl.sum(phi * gd[:, None], 0)
    row = (s.to(tl.int64) * n_bh + bh) * nf + fb
    _put(R, row, Rt, BLOCK_F, BLOCK_DV)
    _put(RRT, row, rr, BLOCK_F, 1)
    _put(RGT, row, sg, BLOCK_DV, 1)


@triton.jit(do_not_specialize=["q_off"])
def favor_bwd_dq_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, HS, HZ, HV, HN, S, Z, VS, NS, CPREV, QOFF, DQ, SPHI, RSQ,
                        q_off, c0, NQ, NK, P, M, NF, N_SEG, H, SEG, scale_x, EPS_Q, EPS_R, EPS_K,
                        KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr,
                        INTRA: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (c, bh): dq (float32), sum phi and sum dL/du of the queries in chunk c0 + c: through the chunk's
    state (`INTRA` false, writes), or through the in-chunk keys (`INTRA`, causal, adds); dq is linear in dL/du,
    so the two parts run as two launches that each keep few tiles alive."""
    c = c0 + tl.program_id(0)
    bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + b)
    t0 = c * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    r = t - q_off
    in_q = (r >= 0) & (r < NQ)
    qx = _rows(Q + bh64 * NQ * D, r, in_q, D, BLOCK_D)
    cq = tl.load(CQ + bh64 * NQ + r, mask=in_q, other=0.0)
    g, gd = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
    if INTRA:
        kx, v, ck, valid = _key_rows(K, V, CK, KPM, bh, b, t, (t < NK) & (t < P), NK, P, HAS_KPM, D, DV, BLOCK_D,
                                     BLOCK_DV)
        ckq = tl.load(CK + bh64 * P + t, mask=t < P, other=0.0)
        gi = tl.dot(g, tl.trans(v), input_precision=PREC) + gd[:, None]        # [query t, key j]
        decay, ok = _weight_tile(ckq, ck, in_q, valid, t, t)
        G = decay * gi
        eps_sum = EPS_K * tl.sum(tl.where(ok, gi, 0.0), 1)
    elif CAUSAL:
        ckq = tl.load(CK + bh64 * P + t, mask=t < P, other=0.0)
        c_prev = tl.load(CK + bh64 * P + tl.maximum(t0 - 1, 0))
        seg = t0 // SEG
        w_seg = tl.exp(tl.load(CPREV + bh64 * N_SEG + seg) - c_prev)
        row = c.to(tl.int64) * n_bh + bh
        srow = seg.to(tl.int64) * n_bh + bh
        vs = _matrix(HV, row, BLOCK_DV, 1) + _matrix(VS, srow, BLOCK_DV, 1)
        ns = tl.load(HN + row) + tl.load(NS + srow)
        eps_sum = EPS_K * (tl.sum(g * vs[None, :], 1) + gd * ns)
        sc = tl.where(in_q, tl.exp(tl.where(in_q, c_prev - ckq, 0.0)), 0.0)
    else:
        vs = _matrix(VS, bh64, BLOCK_DV, 1)
        eps_sum = EPS_K * (tl.sum(g * vs[None, :], 1) + gd * tl.load(NS + bh64))
    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    rsq = tl.zeros([BLOCK_T], tl.float32)
    sphi = tl.zeros([BLOCK_T], tl.float32)
    for fb in range(0, NF):
        wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
        phi = _features_of(qx, in_q, cq, fmask, wt, scale_x, KIND, EPS_Q, PREC)
        if INTRA:
            p = _features_of(kx, valid, ck, fmask, wt, scale_x, KIND, EPS_R, PREC)
            dphi = tl.dot(G, p, input_precision=PREC)
        elif CAUSAL:
            Hc = _matrix(HS, row * NF + fb, BLOCK_F, BLOCK_DV) + w_seg * _matrix(S, srow * NF + fb, BLOCK_F,
                                                                                  BLOCK_DV)
            zc = _matrix(HZ, row * NF + fb, BLOCK_F, 1) + w_seg * _matrix(Z, srow * NF + fb, BLOCK_F, 1)
            dphi = sc[:, None] * (tl.dot(g, tl.trans(Hc), input_precision=PREC) + gd[:, None] * zc[None, :])
        else:
            Hc = _matrix(S, bh64 * NF + fb, BLOCK_F, BLOCK_DV)
            zc = _matrix(Z, bh64 * NF + fb, BLOCK_F, 1)
            dphi = tl.dot(g, tl.trans(Hc), input_precision=PREC) + gd[:, None] * zc[None, :]
        da = tl.where(in_q[:, None], (dphi + eps_sum[:, None]) * _slope(phi, KIND, EPS_Q), 0.0)
        dq += tl.dot(da, tl.trans(wt.to(tl.float32)), input_precision=PREC)
        rsq += tl.sum(da, 1)
        sphi += tl.sum(phi, 1)
    dq = _to_x(dq, rsq, qx, KIND, scale_x)
    rows = bh64 * NQ + r
    offs_d = tl.arange(0, BLOCK_D)
    dq_ptrs = DQ + rows[:, None] * D + offs_d[None, :]
    dq_mask = in_q[:, None] & (offs_d[None, :] < D)
    if INTRA:
        tl.store(dq_ptrs, dq + tl.load(dq_ptrs, mask=dq_mask, other=0.0), mask=dq_mask)
        tl.store(RSQ + rows, rsq + tl.load(RSQ + rows, mask=in_q, other=0.0), mask=in_q)
    else:
        tl.store(dq_ptrs, dq, mask=dq_mask)
        tl.store(SPHI + rows, sphi, mask=in_q)               # for the stabilisers' gradients
        tl.store(RSQ + rows, rsq, mask=in_q)


@triton.jit
def _key_chunk(Q, K, V, CK, KPM, GN, GD, CREF, q_off, c, bh, NQ, NK, P, N_SEG, H, SEG, CAUSAL: tl.constexpr,
               HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    """What the dk and dv programs of key chunk c share: key positions, rows, values, stabilisers, validity, the
    chunk's queries (causal) and the scale `sc` of its keys against the later queries' state, and that state's
    weight `w_seg` of the later segments."""
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    if CAUSAL:
        in_k = (t < NK) & (t < P)
    else:
        in_k = t < NK
    b = bh // H
    kx, v, ck, valid = _key_rows(K, V, CK, KPM, bh, b, t, in_k, NK, P, HAS_KPM, D, DV, BLOCK_D, BLOCK_DV)
    r = t - q_off
    in_q = (r >= 0) & (r < NQ)
    if CAUSAL:
        c_ref = tl.load(CK + bh.to(tl.int64) * P + tl.minimum(c * BLOCK_T + BLOCK_T, P - 1))
        w_seg = tl.exp(c_ref - tl.load(CREF + bh.to(tl.int64) * N_SEG + (c * BLOCK_T) // SEG))
        sc = tl.where(valid, tl.exp(tl.where(valid, ck - c_ref, 0.0)), 0.0)
    else:
        w_seg = 1.0
        sc = valid.to(tl.float32)
    return t, in_k, kx, v, ck, valid, r, in_q, w_seg, sc


@triton.jit
def _later(RS, R, row, srow, fb, NF, w_seg, CAUSAL: tl.constexpr, R_: tl.constexpr, C: tl.constexpr):
    """Feature block fb of the later queries' state of a key chunk (chunk-local part plus the later segments)."""
    if CAUSAL:
        return _matrix(RS, row * NF + fb, R_, C) + w_seg * _matrix(R, srow * NF + fb, R_, C)
    else:
        return _matrix(R, srow * NF + fb, R_, C)


@triton.jit(do_not_specialize=["q_off"])
def favor_bwd_dv_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, RS, RG, R, RGT, CREF, QOFF, DV_, q_off, NQ, NK, P, M, NF,
                        N_SEG, H, SEG, scale_x, EPS_Q, EPS_R, EPS_K, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        PREC: tl.constexpr):
    """Program (c, bh): dv of the keys in chunk c: `sc P_j R + eps sg` over the later queries, plus the in-chunk
    weights `w_tj` (causal) times g."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n_bh = tl.num_programs(1)
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + bh // H)
    t, in_k, kx, v, ck, valid, r, in_q, w_seg, sc = _key_chunk(Q, K, V, CK, KPM, GN, GD, CREF, q_off, c, bh, NQ, NK, P,
                                                               N_SEG, H, SEG, CAUSAL, HAS_KPM, D, DV, BLOCK_T,
                                                               BLOCK_D, BLOCK_DV)
    bh64 = bh.to(tl.int64)
    row = c.to(tl.int64) * n_bh + bh
    if CAUSAL:
        srow = ((c * BLOCK_T) // SEG).to(tl.int64) * n_bh + bh
        qx = _rows(Q + bh64 * NQ * D, r, in_q, D, BLOCK_D)
        cq = tl.load(CQ + bh64 * NQ + r, mask=in_q, other=0.0)
    else:
        srow = bh64
    dv = tl.zeros([BLOCK_T, BLOCK_DV], tl.float32)
    wts = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    sphi = tl.zeros([BLOCK_T], tl.float32)
    sg = tl.zeros([BLOCK_DV], tl.float32)
    for fb in range(0, NF):
        wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
        p = _features_of(kx, valid, ck, fmask, wt, scale_x, KIND, EPS_R, PREC)
        dv += tl.dot(p, _later(RS, R, row, srow, fb, NF, w_seg, CAUSAL, BLOCK_F, BLOCK_DV), input_precision=PREC)
        if CAUSAL:
            sg += _matrix(RG, row * NF + fb, BLOCK_DV, 1) + _matrix(RGT, srow * NF + fb, BLOCK_DV, 1)
            phi = _features_of(qx, in_q, cq, fmask, wt, scale_x, KIND, EPS_Q, PREC)
            wts += tl.dot(phi, tl.trans(p), input_precision=PREC)
            sphi += tl.sum(phi, 1)
        else:
            sg += _matrix(RGT, srow * NF + fb, BLOCK_DV, 1)
    dv = dv * sc[:, None]
    if CAUSAL:
        ckq = tl.load(CK + bh64 * P + t, mask=t < P, other=0.0)
        decay, ok = _weight_tile(ckq, ck, in_q, valid, t, t)               # [query t, key j]
        wts = wts * decay + tl.where(ok, EPS_K * sphi[:, None], 0.0)
        g, _ = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
        dv += tl.dot(tl.trans(wts), g, input_precision=PREC)
    dv = tl.where(valid[:, None], dv + EPS_K * sg[None, :], 0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(DV_ + (bh64 * NK + t)[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=in_k[:, None] & (offs_dv[None, :] < DV))


@triton.jit(do_not_specialize=["q_off"])
def favor_bwd_dk_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, RS, RR, R, RRT, CREF, QOFF, DK, q_off, NQ, NK, P, M, NF,
                        N_SEG, H, SEG, scale_x, EPS_Q, EPS_R, EPS_K, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        PREC: tl.constexpr):
    """Program (c, bh): dk (float32, before the stabilisers' part) of the keys in chunk c, through
    `dP_j = sc (v_j R^T + r) + sum_t G_tj phi_q(t)` (in-chunk queries t when causal)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    n_bh = tl.num_programs(1)
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + bh // H)
    t, in_k, kx, v, ck, valid, r, in_q, w_seg, sc = _key_chunk(Q, K, V, CK, KPM, GN, GD, CREF, q_off, c, bh, NQ, NK, P,
                                                               N_SEG, H, SEG, CAUSAL, HAS_KPM, D, DV, BLOCK_T,
                                                               BLOCK_D, BLOCK_DV)
    bh64 = bh.to(tl.int64)
    row = c.to(tl.int64) * n_bh + bh
    if CAUSAL:
        srow = ((c * BLOCK_T) // SEG).to(tl.int64) * n_bh + bh
        qx = _rows(Q + bh64 * NQ * D, r, in_q, D, BLOCK_D)
        cq = tl.load(CQ + bh64 * NQ + r, mask=in_q, other=0.0)
        g, gd = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
        ckq = tl.load(CK + bh64 * P + t, mask=t < P, other=0.0)
        decay, _ = _weight_tile(ckq, ck, in_q, valid, t, t)                # [query t, key j]
        GT = tl.trans(decay * (tl.dot(g, tl.trans(v), input_precision=PREC) + gd[:, None]))
    else:
        srow = bh64
    dk = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    sda = tl.zeros([BLOCK_T], tl.float32)
    for fb in range(0, NF):
        wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
        p = _features_of(kx, valid, ck, fmask, wt, scale_x, KIND, EPS_R, PREC)
        Rc = _later(RS, R, row, srow, fb, NF, w_seg, CAUSAL, BLOCK_F, BLOCK_DV)
        rc = _later(RR, RRT, row, srow, fb, NF, w_seg, CAUSAL, BLOCK_F, 1)
        dp = sc[:, None] * (tl.dot(v, tl.trans(Rc), input_precision=PREC) + rc[None, :])
        if CAUSAL:
            phi = _features_of(qx, in_q, cq, fmask, wt, scale_x, KIND, EPS_Q, PREC)
            dp += tl.dot(GT, phi, input_precision=PREC)
        da = tl.where(valid[:, None], dp * _slope(p, KIND, EPS_R), 0.0)
        dk += tl.dot(da, tl.trans(wt.to(tl.float32)), input_precision=PREC)
        sda += tl.sum(da, 1)
    dk = _to_x(dk, sda, kx, KIND, scale_x)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DK + (bh64 * NK + t)[:, None] * D + offs_d[None, :], dk, mask=in_k[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------- launchers
def reverse_states(q, w, cq, ck, gn, gd, offsets, P: int, seg: int, n_seg: int, scale_x: float, eps_q: float,
                   opts: dict):
    """Walk the queries of every segment backward: (per-chunk local states RS `[n_chunks, BH, nf, BF, BDV]`, RR,
    RG when causal, else None) and the segments' totals R, RRT `[n_seg, BH, nf, BF]`, RGT `[n_seg, BH, nf, BDV]`
    (P: the length of the queries' domain, positions or rows)."""
    B, H, NQ, _ = q.shape
    bf, bdv, bt = opts["BLOCK_F"], opts["BLOCK_DV"], opts["BLOCK_T"]
    nf = triton.cdiv(w.shape[0], bf)
    f32 = dict(dtype=torch.float32, device=q.device)
    causal = opts["CAUSAL"]

    def states(n):
        return (torch.empty(n, B * H, nf, bf, bdv, **f32), torch.empty(n, B * H, nf, bf, **f32),
                torch.empty(n, B * H, nf, bdv, **f32))
    totals = states(n_seg)
    chunks = states(triton.cdiv(P, bt)) if causal else None
    keep = {k: v for k, v in launch(opts, "rstate").items() if k not in ("HAS_KPM", "DV")}
    favor_rstate_kernel[(B * H, nf, n_seg)](
        q, w, cq, ck, gn, gd, offsets.tensor(cq), *(chunks or totals), *totals, offsets.scalar if causal else 0, NQ,
        P, w.shape[0], H, seg, scale_x, eps_q, ROW_OFFSETS=offsets.per_row and causal, **keep)
    return chunks, totals


def favor_bwd(q, k, v, w, cq, ck, kpm, gn, gd, chunks, states, c_prev, rchunks, rstates, c_ref, offsets, P: int,
              seg: int, kind: int, eps: float, scale_x: float, opts: dict):
    """(dq, dk float32 `[B, H, N, D]`, dv in v's dtype, sphi, rsq `[B, H, N_q]`): one program per chunk of queries
    (from the forward's states) and one per chunk of keys (from the later queries' states `rchunks`, `rstates`,
    references `c_ref [BH, n_seg]`)."""
    B, H, NQ, D = q.shape
    NK, DV = k.shape[2], v.shape[3]
    bt = opts["BLOCK_T"]
    nf = triton.cdiv(w.shape[0], opts["BLOCK_F"])
    causal = opts["CAUSAL"]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, sphi, rsq = torch.empty(B, H, NQ, D, **f32), torch.empty(B, H, NQ, **f32), torch.empty(B, H, NQ, **f32)
    seen = min(NK, P) if causal else NK                # keys past the last query get no gradient
    dk = (torch.empty if seen == NK else torch.zeros)(B, H, NK, D, **f32)
    dv = (torch.empty if seen == NK else torch.zeros)(B, H, NK, DV, dtype=v.dtype, device=v.device)
    kpm_ = kpm if kpm is not None else cq
    q_off = offsets.scalar if causal else 0
    eps3 = eps_values(kind, eps)
    rows = dict(ROW_OFFSETS=offsets.per_row and causal)
    c0 = min(offsets.values, default=0) // bt if causal else 0
    for intra in (False, True) if causal else (False,):           # the state's part, then the in-chunk keys'
        favor_bwd_dq_kernel[(triton.cdiv(P, bt) - c0, B * H)](
            q, k, v, w, cq, ck, kpm_, gn, gd, *(chunks or states), *states, c_prev, offsets.tensor(cq), dq, sphi,
            rsq, q_off, c0, NQ, NK, P, w.shape[0], nf, c_prev.shape[-1], H, seg, scale_x, *eps3, INTRA=intra, **rows,
            **launch(opts, "dq"))
    if seen:
        RS, RR, RG = rchunks or rstates
        R, RRT, RGT = rstates
        common = (q, k, v, w, cq, ck, kpm_, gn, gd)
        scalars = (q_off, NQ, NK, P if causal else NK, w.shape[0], nf, c_ref.shape[-1], H, seg, scale_x, *eps3)
        grid = (triton.cdiv(seen, bt), B * H)
        favor_bwd_dv_kernel[grid](*common, RS, RG, R, RGT, c_ref, offsets.tensor(cq), dv, *scalars, **rows,
                                  **launch(opts, "dv"))
        favor_bwd_dk_kernel[grid](*common, RS, RR, R, RRT, c_ref, offsets.tensor(cq), dk, *scalars, **rows,
                                  **launch(opts, "dk"))
    return dq, dk, dv, sphi, rsq
