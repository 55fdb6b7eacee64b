"""Linear attention with fused feature maps, backward (the forward's notation and segments, see favor_fwd.py).

With `g_t = dout_t / den_t` and `gd_t = -(dout_t . out_t) / den_t`, each weight `w_tj` receives
`G_tj = v_j . g_t + gd_t`. Then `dphi_q(t) = sum_j exp(ck_j - ck_t) P_j G_tj + EPS_K sum_j G_tj` (a forward
walk from the same states as the forward), `dv_j = sum_t w_tj g_t` and `dP_j = sum_t exp(ck_j - ck_t) phi_q(t)
G_tj` (a reverse walk from `R = sum_t exp(c - ck_t) phi_q(t)^T g_t` over the later queries: local per segment
in `favor_rstate_kernel`, combined into the state after each segment by the launcher). Feature gradients go
back through `u = x' W^T` (and `|x'|^2 / 2` for FAVOR+) with the stabilisers held constant, as in
performer-pytorch's `.detach()`. Each program writes partial dq, dk, dv for its feature block; the launcher
sums them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .favor_fwd import _keys, _load_state, _queries, _segment, _state_index, _weight_tile, _wt, eps_values


@triton.jit
def _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV: tl.constexpr):
    rows = bh.to(tl.int64) * NQ + r
    g = tl.load(GN + rows[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], mask=in_q[:, None], other=0.0)
    return g, tl.load(GD + rows, mask=in_q, other=0.0)


@triton.jit
def _to_x(da, x, wt, KIND: tl.constexpr, scale_x, PREC: tl.constexpr):
    """Gradient wrt the unscaled input rows `x` of a chunk from dL/du (plus the |x'|^2/2 term for FAVOR+)."""
    dx = tl.dot(da, tl.trans(wt.to(tl.float32)), input_precision=PREC)
    if KIND == 0:
        dx -= tl.sum(da, 1)[:, None] * (x.to(tl.float32) * scale_x)
    return dx * scale_x


@triton.jit
def _store(OUT, fb, bh, r, ok, N, val, BLOCK: tl.constexpr):
    rows = (fb * tl.num_programs(0) + bh).to(tl.int64) * N + r
    tl.store(OUT + rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], val, mask=ok[:, None])


@triton.jit(do_not_specialize=["q_off"])
def favor_bwd_dq_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, S, Z, VS, NS, CPREV, QOFF, DQP, SPHI, RSQ, q_off, NQ, NK,
                        P, M, H, SEG, scale_x, EPS_Q, EPS_R, EPS_K, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, fb, s): the queries of segment s, walked forward from the state before it."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = bh // H
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + b)
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo, hi = _segment(s, SEG, P)
    hi = tl.minimum(hi, q_off + NQ)
    hi = tl.where(hi > q_off, hi, lo)
    if CAUSAL:
        St, z, vs, ns = _load_state(S, Z, VS, NS, bh, fb, s, BLOCK_F, BLOCK_DV)
        c_prev = tl.load(CPREV + bh.to(tl.int64) * tl.num_programs(2) + s)
    else:
        St, z, vs, ns = _load_state(S, Z, VS, NS, bh, fb, s * 0, BLOCK_F, BLOCK_DV)
        c_prev = 0.0
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        r = t - q_off
        in_q = (r >= 0) & (r < NQ) & (t < hi)
        phi, dphi_du, qx = _queries(Q, CQ, bh, r, in_q, NQ, fmask, wt, scale_x, KIND, EPS_Q, D, BLOCK_D, PREC)
        g, gd = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
        if CAUSAL:
            p, _, _, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, (t < NK) & (t < hi), NK, P, fmask, wt, scale_x,
                                          KIND, EPS_R, HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
            ckq = tl.load(CK + bh.to(tl.int64) * P + t, mask=t < P, other=0.0)
            sc = tl.where(in_q, tl.exp(tl.where(in_q, c_prev - ckq, 0.0)), 0.0)
            dphi = sc[:, None] * (tl.dot(g, tl.trans(St), input_precision=PREC) + gd[:, None] * z[None, :])
            eps_term = EPS_K * (tl.sum(g * vs[None, :], 1) + gd * ns)
            decay, ok = _weight_tile(ckq, ck, in_q, valid, t, t)
            gi = tl.dot(g, tl.trans(v), input_precision=PREC) + gd[:, None]
            dphi += tl.dot(decay * gi, p, input_precision=PREC)
            eps_term += EPS_K * tl.sum(tl.where(ok, gi, 0.0), 1)
            c_end = tl.load(CK + bh.to(tl.int64) * P + tl.minimum(t0 + BLOCK_T, P) - 1)
            pe = p * tl.where(valid, tl.exp(tl.where(valid, ck - c_end, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_prev - c_end)
            St = St * rescale + tl.dot(tl.trans(pe), v, input_precision=PREC)
            z = z * rescale + tl.sum(pe, 0)
            vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
            ns += tl.sum(valid.to(tl.float32), 0)
            c_prev = c_end
        else:
            dphi = tl.dot(g, tl.trans(St), input_precision=PREC) + gd[:, None] * z[None, :]
            eps_term = EPS_K * (tl.sum(g * vs[None, :], 1) + gd * ns)
        dphi += eps_term[:, None]
        da = tl.where(fmask[None, :], dphi * dphi_du, 0.0)
        _store(DQP, fb, bh, r, in_q, NQ, _to_x(da, qx, wt, KIND, scale_x, PREC), BLOCK_D)
        rows = (fb * tl.num_programs(0) + bh).to(tl.int64) * NQ + r
        tl.store(SPHI + rows, tl.sum(phi, 1), mask=in_q)     # for the stabilisers' gradients
        tl.store(RSQ + rows, tl.sum(da, 1), mask=in_q)


@triton.jit(do_not_specialize=["q_off"])
def favor_rstate_kernel(Q, W, CQ, CK, GN, GD, QOFF, R, RR, SG, q_off, NQ, P, M, H, SEG, scale_x, EPS_Q,
                        KIND: tl.constexpr, CAUSAL: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, fb, s): the queries of segment s summed into a local reverse state, relative to the
    stabiliser at the segment's first position (causal)."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + bh // H)
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo, hi = _segment(s, SEG, P)
    if CAUSAL:
        c_start = tl.load(CK + bh.to(tl.int64) * P + tl.minimum(lo, P - 1))
    else:
        c_start = 0.0
    Rt = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    rr = tl.zeros([BLOCK_F], tl.float32)
    sg = tl.zeros([BLOCK_DV], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        r = t - q_off
        in_q = (r >= 0) & (r < NQ) & (t < hi)
        phi, _, _ = _queries(Q, CQ, bh, r, in_q, NQ, fmask, wt, scale_x, KIND, EPS_Q, D, BLOCK_D, PREC)
        g, gd = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
        sphi = tl.sum(phi, 1)
        if CAUSAL:
            ckq = tl.load(CK + bh.to(tl.int64) * P + t, mask=in_q, other=0.0)
            phi = phi * tl.where(in_q, tl.exp(tl.where(in_q, c_start - ckq, 0.0)), 0.0)[:, None]
        Rt += tl.dot(tl.trans(phi), g, input_precision=PREC)
        rr += tl.sum(phi * gd[:, None], 0)
        sg += tl.sum(sphi[:, None] * g, 0)
    row = _state_index(bh, fb, s)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(R + (row * BLOCK_F + offs_f[:, None]) * BLOCK_DV + offs_dv[None, :], Rt)
    tl.store(RR + row * BLOCK_F + offs_f, rr)
    tl.store(SG + row * BLOCK_DV + offs_dv, sg)


@triton.jit(do_not_specialize=["q_off"])
def favor_bwd_dkdv_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, R, RR, SG, CREF, QOFF, DKP, DVP, q_off, NQ, NK, P,
                          M, H, SEG, scale_x, EPS_Q, EPS_R, EPS_K, KIND: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr,
                          D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, fb, s): the keys of segment s, walked backward from the state of the later queries."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = bh // H
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + b)
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo, hi = _segment(s, SEG, P)
    if CAUSAL:
        row = _state_index(bh, fb, s)
        c_ref = tl.load(CREF + bh.to(tl.int64) * tl.num_programs(2) + s)
    else:
        row = _state_index(bh, fb, s * 0)
        c_ref = 0.0
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    Rt = tl.load(R + (row * BLOCK_F + offs_f[:, None]) * BLOCK_DV + offs_dv[None, :])
    rr = tl.load(RR + row * BLOCK_F + offs_f)
    sg = tl.load(SG + row * BLOCK_DV + offs_dv)
    n_chunks = tl.cdiv(hi - lo, BLOCK_T)
    for c in range(0, n_chunks):
        t0 = lo + (n_chunks - 1 - c) * BLOCK_T                      # last chunk first
        t = t0 + tl.arange(0, BLOCK_T)
        in_k = (t < hi) & (t < NK)
        p, dp_du, kx, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, in_k, NK, P, fmask, wt, scale_x, KIND, EPS_R,
                                           HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
        if CAUSAL:
            sc = tl.where(valid, tl.exp(tl.where(valid, ck - c_ref, 0.0)), 0.0)
        else:
            sc = valid.to(tl.float32)
        dv = sc[:, None] * tl.dot(p, Rt, input_precision=PREC) + tl.where(valid[:, None], EPS_K * sg[None, :], 0.0)
        dp = sc[:, None] * (tl.dot(v, tl.trans(Rt), input_precision=PREC) + rr[None, :])
        if CAUSAL:
            r = t - q_off
            in_q = (r >= 0) & (r < NQ) & (t < hi)
            phi, _, _ = _queries(Q, CQ, bh, r, in_q, NQ, fmask, wt, scale_x, KIND, EPS_Q, D, BLOCK_D, PREC)
            g, gd = _grads(GN, GD, bh, r, in_q, NQ, BLOCK_DV)
            sphi = tl.sum(phi, 1)
            ckq = tl.load(CK + bh.to(tl.int64) * P + t, mask=t < P, other=0.0)
            decay, ok = _weight_tile(ckq, ck, in_q, valid, t, t)                # [query t, key j]
            wts = tl.dot(phi, tl.trans(p), input_precision=PREC) * decay + tl.where(ok, EPS_K * sphi[:, None], 0.0)
            dv += tl.dot(tl.trans(wts), g, input_precision=PREC)
            gi = tl.dot(g, tl.trans(v), input_precision=PREC) + gd[:, None]     # [query t, key j]
            dp += tl.dot(tl.trans(decay * gi), phi, input_precision=PREC)
            c_new = tl.load(CK + bh.to(tl.int64) * P + t0)
            qe = phi * tl.where(in_q, tl.exp(tl.where(in_q, c_new - ckq, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_new - c_ref)
            Rt = Rt * rescale + tl.dot(tl.trans(qe), g, input_precision=PREC)
            rr = rr * rescale + tl.sum(qe * gd[:, None], 0)
            sg += tl.sum(sphi[:, None] * g, 0)
            c_ref = c_new
        da = tl.where(valid[:, None] & fmask[None, :], dp * dp_du, 0.0)
        _store(DKP, fb, bh, t, in_k, NK, _to_x(da, kx, wt, KIND, scale_x, PREC), BLOCK_D)
        _store(DVP, fb, bh, t, in_k, NK, tl.where(valid[:, None], dv, 0.0), BLOCK_DV)


# ----------------------------------------------------------------------------------------------- launchers
def reverse_states(q, w, cq, ck, gn, gd, offsets, P: int, seg: int, n_seg: int, scale_x: float, eps_q: float,
                   opts: dict):
    """Local reverse states of every segment of queries: R `[n_seg, BH, nf, BF, BDV]`, r `[n_seg, BH, nf, BF]`,
    sums of sphi g `[n_seg, BH, nf, BDV]` (P: the query domain's length)."""
    B, H, NQ, _ = q.shape
    bf, bdv = opts["BLOCK_F"], opts["BLOCK_DV"]
    nf = triton.cdiv(w.shape[0], bf)
    f32 = dict(dtype=torch.float32, device=q.device)
    R, RR = torch.empty(n_seg, B * H, nf, bf, bdv, **f32), torch.empty(n_seg, B * H, nf, bf, **f32)
    SG = torch.empty(n_seg, B * H, nf, bdv, **f32)
    keep = {k: opts[k] for k in ("KIND", "CAUSAL", "D", "BLOCK_T", "BLOCK_F", "BLOCK_D", "BLOCK_DV", "PREC",
                                 "num_warps") if k in opts}
    favor_rstate_kernel[(B * H, nf, n_seg)](
        q, w, cq, ck, gn, gd, offsets.tensor(cq), R, RR, SG, offsets.scalar if opts["CAUSAL"] else 0, NQ, P,
        w.shape[0], H, seg, scale_x, eps_q, ROW_OFFSETS=offsets.per_row and opts["CAUSAL"], **keep)
    return R, RR, SG


def favor_bwd(q, k, v, w, cq, ck, kpm, gn, gd, states, c_prev, rstates, c_ref, offsets, P: int, seg_q: int,
              n_q: int, seg_k: int, n_k: int, kind: int, eps: float, scale_x: float, opts: dict):
    """Partial-summed (dq `[B, H, N_q, BD]`, dk, dv, sphi `[B, H, N_q]`, rsq `[B, H, N_q]`) in float32: the forward
    walk over query segments (states before each, `c_prev`) and the reverse walk over key segments (states of the
    later queries `rstates`, `c_ref`)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    bf, bd, bdv = opts["BLOCK_F"], opts["BLOCK_D"], opts["BLOCK_DV"]
    nf = triton.cdiv(w.shape[0], bf)
    f32 = dict(dtype=torch.float32, device=q.device)
    causal = opts["CAUSAL"]
    dqp, sphi, rsq = torch.empty(nf, B * H, NQ, bd, **f32), torch.empty(nf, B * H, NQ, **f32), \
        torch.empty(nf, B * H, NQ, **f32)
    seen = min(NK, P) if causal else NK                # keys past the last query get no gradient
    alloc = torch.empty if seen == NK else torch.zeros
    dkp, dvp = alloc(nf, B * H, NK, bd, **f32), alloc(nf, B * H, NK, bdv, **f32)
    kpm_ = kpm if kpm is not None else cq
    q_off = offsets.scalar if causal else 0
    eps3 = eps_values(kind, eps)
    rows = dict(ROW_OFFSETS=offsets.per_row and causal, **opts)
    favor_bwd_dq_kernel[(B * H, nf, n_q)](q, k, v, w, cq, ck, kpm_, gn, gd, *states, c_prev, offsets.tensor(cq), dqp,
                                          sphi, rsq, q_off, NQ, NK, P, w.shape[0], H, seg_q, scale_x, *eps3, **rows)
    favor_bwd_dkdv_kernel[(B * H, nf, n_k)](q, k, v, w, cq, ck, kpm_, gn, gd, *rstates, c_ref, offsets.tensor(cq), dkp,
                                            dvp, q_off, NQ, NK, P if causal else NK, w.shape[0], H, seg_k,
                                            scale_x, *eps3, **rows)
    return dqp.sum(0), dkp.sum(0), dvp.sum(0), sphi.sum(0), rsq.sum(0)
