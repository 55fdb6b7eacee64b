"""Linear attention with fused feature maps, backward (the forward's notation, see favor_fwd.py).

With `g_t = dout_t / den_t` and `gd_t = -(dout_t . out_t) / den_t`, each weight `w_tj` receives
`G_tj = v_j . g_t + gd_t`. Then `dphi_q(t) = sum_j exp(ck_j - ck_t) P_j G_tj + EPS_K sum_j G_tj` (a forward
scan over the same state as the forward), `dv_j = sum_t w_tj g_t` and `dP_j = sum_t exp(ck_j - ck_t) phi_q(t)
G_tj` (a reverse scan with `R = sum_t exp(c - ck_t) phi_q(t)^T g_t`). Feature gradients go back through
`u = x' W^T` (and `|x'|^2 / 2` for FAVOR+) with the stabilisers held constant, as in performer-pytorch's
`.detach()`. One program per (batch-head, feature block); the launcher sums the partial dq, dk, dv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .favor_fwd import FAVOR, _keys, _queries, _weight_tile, blocks, eps_values, precision


@triton.jit
def _grads(GN, GD, bh, t, in_t, N, BLOCK_DV: tl.constexpr):
    rows = bh.to(tl.int64) * N + t
    g = tl.load(GN + rows[:, None] * BLOCK_DV + tl.arange(0, BLOCK_DV)[None, :], mask=in_t[:, None], other=0.0)
    return g, tl.load(GD + rows, mask=in_t, other=0.0)


@triton.jit
def _to_x(da, x, wt, KIND: tl.constexpr, scale_x, PREC: tl.constexpr):
    """Gradient wrt the unscaled input of a chunk from dL/du (plus the |x'|^2/2 term for FAVOR+)."""
    dx = tl.dot(da, tl.trans(wt), input_precision=PREC)
    if KIND == 0:
        dx -= tl.sum(da, 1)[:, None] * x
    return dx * scale_x


@triton.jit
def _store(OUT, fb, bh, t, in_t, N, val, BLOCK: tl.constexpr):
    rows = (fb * tl.num_programs(0) + bh).to(tl.int64) * N + t
    tl.store(OUT + rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], val, mask=in_t[:, None])


@triton.jit
def favor_bwd_dq_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, DQP, SPHI, RSQ, NQ, NK, M, H, scale_x, EPS_Q, EPS_R, EPS_K,
                        KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr,
                        DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    fb = tl.program_id(1)
    b = bh // H
    f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = f < M
    offs_d = tl.arange(0, BLOCK_D)
    wt = tl.load(W + f[None, :] * D + offs_d[:, None], mask=fmask[None, :] & (offs_d[:, None] < D),
                 other=0.0).to(tl.float32)
    S = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    vs = tl.zeros([BLOCK_DV], tl.float32)
    ns = 0.0
    c_prev = tl.load(CK + bh.to(tl.int64) * NK)
    if not CAUSAL:
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
        phi, dphi_du, qx = _queries(Q, CQ, bh, t, in_t, fmask, wt, scale_x, NQ, KIND, EPS_Q, D, BLOCK_D, PREC)
        g, gd = _grads(GN, GD, bh, t, in_t, NQ, BLOCK_DV)
        if CAUSAL:
            p, _, _, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, in_t, fmask, wt, scale_x, NK, KIND, EPS_R,
                                          HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
            sc = tl.where(in_t, tl.exp(tl.where(in_t, c_prev - ck, 0.0)), 0.0)
            dphi = sc[:, None] * (tl.dot(g, tl.trans(S), input_precision=PREC) + gd[:, None] * z[None, :])
            eps_term = EPS_K * (tl.sum(g * vs[None, :], 1) + gd * ns)
            decay, ok = _weight_tile(ck, ck, in_t, valid, t, t)
            gi = tl.dot(g, tl.trans(v), input_precision=PREC) + gd[:, None]
            dphi += tl.dot(decay * gi, p, input_precision=PREC)
            eps_term += EPS_K * tl.sum(tl.where(ok, gi, 0.0), 1)
            c_end = tl.max(tl.where(in_t, ck, float("-inf")), 0)
            pe = p * tl.where(valid, tl.exp(tl.where(valid, ck - c_end, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_prev - c_end)
            S = S * rescale + tl.dot(tl.trans(pe), v, input_precision=PREC)
            z = z * rescale + tl.sum(pe, 0)
            vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
            ns += tl.sum(valid.to(tl.float32), 0)
            c_prev = c_end
        else:
            dphi = tl.dot(g, tl.trans(S), input_precision=PREC) + gd[:, None] * z[None, :]
            eps_term = EPS_K * (tl.sum(g * vs[None, :], 1) + gd * ns)
        dphi += eps_term[:, None]
        da = tl.where(fmask[None, :], dphi * dphi_du, 0.0)
        _store(DQP, fb, bh, t, in_t, NQ, _to_x(da, qx, wt, KIND, scale_x, PREC), BLOCK_D)
        rows = (fb * tl.num_programs(0) + bh).to(tl.int64) * NQ + t
        tl.store(SPHI + rows, tl.sum(phi, 1), mask=in_t)     # for the stabilisers' gradients
        tl.store(RSQ + rows, tl.sum(da, 1), mask=in_t)


@triton.jit
def favor_bwd_dkdv_kernel(Q, K, V, W, CQ, CK, KPM, GN, GD, DKP, DVP, NQ, NK, M, H, scale_x, EPS_Q, EPS_R, EPS_K,
                          KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr,
                          DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    fb = tl.program_id(1)
    b = bh // H
    f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = f < M
    offs_d = tl.arange(0, BLOCK_D)
    wt = tl.load(W + f[None, :] * D + offs_d[:, None], mask=fmask[None, :] & (offs_d[:, None] < D),
                 other=0.0).to(tl.float32)
    R = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)   # sum_t exp(c_ref - ck_t) phi_q(t)^T g_t over later queries
    r = tl.zeros([BLOCK_F], tl.float32)
    sg = tl.zeros([BLOCK_DV], tl.float32)           # sum_t sphi_t g_t
    n_chunks = tl.cdiv(NK, BLOCK_T)
    c_ref = tl.load(CK + bh.to(tl.int64) * NK + NK - 1)
    if not CAUSAL:
        for t0 in range(0, NQ, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            phi, _, _ = _queries(Q, CQ, bh, t, t < NQ, fmask, wt, scale_x, NQ, KIND, EPS_Q, D, BLOCK_D, PREC)
            g, gd = _grads(GN, GD, bh, t, t < NQ, NQ, BLOCK_DV)
            R += tl.dot(tl.trans(phi), g, input_precision=PREC)
            r += tl.sum(phi * gd[:, None], 0)
            sg += tl.sum(tl.sum(phi, 1)[:, None] * g, 0)
    for c in range(0, n_chunks):
        t = (n_chunks - 1 - c) * BLOCK_T + tl.arange(0, BLOCK_T)   # last chunk first
        in_t = t < NK
        p, dp_du, kx, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, in_t, fmask, wt, scale_x, NK, KIND, EPS_R,
                                           HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
        if CAUSAL:
            sc = tl.where(valid, tl.exp(tl.where(valid, ck - c_ref, 0.0)), 0.0)
        else:
            sc = valid.to(tl.float32)
        dv = sc[:, None] * tl.dot(p, R, input_precision=PREC) + tl.where(valid[:, None], EPS_K * sg[None, :], 0.0)
        dp = sc[:, None] * (tl.dot(v, tl.trans(R), input_precision=PREC) + r[None, :])
        if CAUSAL:
            phi, _, _ = _queries(Q, CQ, bh, t, in_t, fmask, wt, scale_x, NQ, KIND, EPS_Q, D, BLOCK_D, PREC)
            g, gd = _grads(GN, GD, bh, t, in_t, NQ, BLOCK_DV)
            sphi = tl.sum(phi, 1)
            decay, ok = _weight_tile(ck, ck, in_t, valid, t, t)                # [t, j]
            wts = tl.dot(phi, tl.trans(p), input_precision=PREC) * decay + tl.where(ok, EPS_K * sphi[:, None], 0.0)
            dv += tl.dot(tl.trans(wts), g, input_precision=PREC)
            gi = tl.dot(g, tl.trans(v), input_precision=PREC) + gd[:, None]    # [t, j]
            dp += tl.dot(tl.trans(decay * gi), phi, input_precision=PREC)
            c_new = tl.min(tl.where(in_t, ck, float("inf")), 0)
            qe = phi * tl.where(in_t, tl.exp(tl.where(in_t, c_new - ck, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_new - c_ref)
            R = R * rescale + tl.dot(tl.trans(qe), g, input_precision=PREC)
            r = r * rescale + tl.sum(qe * gd[:, None], 0)
            sg += tl.sum(sphi[:, None] * g, 0)
            c_ref = c_new
        da = tl.where(valid[:, None] & fmask[None, :], dp * dp_du, 0.0)
        _store(DKP, fb, bh, t, in_t, NK, _to_x(da, kx, wt, KIND, scale_x, PREC), BLOCK_D)
        _store(DVP, fb, bh, t, in_t, NK, tl.where(valid[:, None], dv, 0.0), BLOCK_DV)


# ----------------------------------------------------------------------------------------------- launcher
def favor_bwd(dout, q, k, v, w, stab, kpm, out, den, kind: int, causal: bool, eps: float, scale_x: float):
    """(dq, dk, dv) in the inputs' dtypes; `out`, `den` from the forward, `stab` the `Stabilisers`.
    Tensors contiguous; causal needs N_q == N_k."""
    B, H, N, D = q.shape
    NK, DV, M = k.shape[2], v.shape[3], w.shape[0]
    bt, bf = blocks(max(N, NK), M, q.device)
    nf = triton.cdiv(M, bf)
    bd, bdv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    safe = torch.where(den > 0, den, 1.0)
    g = torch.where((den > 0)[..., None], dout.float() / safe[..., None], 0.0)
    gd = torch.where(den > 0, -(dout.float() * out.float()).sum(-1) / safe, 0.0)
    gn = torch.nn.functional.pad(g, (0, bdv - DV)).contiguous()
    f32 = dict(dtype=torch.float32, device=q.device)
    dqp, dkp = torch.zeros(nf, B * H, N, bd, **f32), torch.zeros(nf, B * H, NK, bd, **f32)
    dvp = torch.zeros(nf, B * H, NK, bdv, **f32)
    sphi, rsq = torch.zeros(nf, B * H, N, **f32), torch.zeros(nf, B * H, N, **f32)
    if N and NK and B * H:
        args = (q, k, v, w, stab.cq, stab.ck, kpm if kpm is not None else stab.cq, gn, gd.contiguous())
        meta = dict(KIND=kind, CAUSAL=causal, HAS_KPM=kpm is not None, D=D, DV=DV, BLOCK_T=bt, BLOCK_F=bf,
                    BLOCK_D=bd, BLOCK_DV=bdv, PREC=precision(q.dtype))
        scalars = (N, NK, M, H, scale_x, *eps_values(kind, eps))
        favor_bwd_dq_kernel[(B * H, nf)](*args, dqp, sphi, rsq, *scalars, **meta)
        favor_bwd_dkdv_kernel[(B * H, nf)](*args, dkp, dvp, *scalars, **meta)
    dq = dqp.sum(0)[..., :D].reshape(B, H, N, D)
    dk = dkp.sum(0)[..., :D].reshape(B, H, NK, D)
    dv = dvp.sum(0)[..., :DV].reshape(B, H, NK, DV)
    if kind == FAVOR and N and NK:
        valid = torch.ones(B, NK, dtype=torch.bool, device=q.device) if kpm is None else kpm == 0
        _stabiliser_grads(dq, dk, g, gd, sphi.sum(0).view(B, H, N), rsq.sum(0).view(B, H, N), v, valid,
                          w.float() * scale_x, stab, causal, eps)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _stabiliser_grads(dq, dk, g, gd, sphi, rsq, v, valid, ws, stab, causal: bool, eps: float) -> None:
    """Add, in place, the gradients that flow through the FAVOR+ maxima to the arg-max feature of each.

    Query t: `d cq_t = -sum_f dL/du_tf` (from the kernel). Keys: since `sum_j w_tj G_tj = 0`, only the eps
    term moves: `d ck_t = eps * sum_f phi_q(t) * sum_{valid j (<= t)} G_tj`; it reaches the key that holds
    the max (the running max's arg-max when causal)."""
    dq += rsq.neg()[..., None] * ws[stab.q_arg]
    vv = v.float() * valid[:, None, :, None]
    cnt = valid[:, None, :].float()
    if causal:
        sg = (g * vv.cumsum(2)).sum(-1) + gd * cnt.cumsum(-1)
    else:
        sg = (g * vv.sum(2, keepdim=True)).sum(-1) + gd * cnt.sum(-1, keepdim=True)
    dr = eps * sphi * sg                                                   # [B, H, N]
    if not causal:
        dr = dr.sum(-1, keepdim=True)
    B, H, NK, D = dk.shape
    j = stab.j_star.expand(B, H, dr.shape[-1])
    feat = torch.gather(stab.k_arg, 2, j)                                  # arg-max feature of that key
    add = dr[..., None] * ws[feat]                                         # [B, H, N, D]
    dk.view(B * H, NK, D).scatter_add_(1, j.reshape(B * H, -1, 1).expand(-1, -1, D), add.reshape(B * H, -1, D))
