"""Linear attention with the feature map fused in (FAVOR+, relu features, elu+1), forward, in chunked states.

With `x' = x * scale_x` and `u = x' W^T` (a feature block of `W [m, D]` at a time), the features are
FAVOR+: `phi_q = exp(u - |x'|^2/2 - cq) + eps` (`cq` the query's max over its `u`) and, for key `j` seen from
query `t`, `phi_k = exp(u_j - h_j - ck_t) + eps = exp(ck_j - ck_t) P_j + eps` with `P_j = exp(u_j - h_j - ck_j)
<= 1`; relu: `phi = relu(u) + 1e-3`; elu+1: `phi = elu(x) + 1` (W = I). The common factor m^-1/2 cancels.

    num_t = sum_j w_tj v_j,  den_t = sum_j w_tj,  w_tj = exp(ck_j - ck_t) phi_q(t).P_j + EPS_K sum_f phi_q(t)

over valid keys `j` (all of them, or `j <= t` when causal; `EPS_K` = eps for FAVOR+, 0 otherwise). `ck` is a
constant (non-causal) or a running max over keys (causal, non-decreasing), so no query sees a future key.

The sequence is cut into segments of SEG tokens that run in parallel (as flash-linear-attention's chunked
form): `favor_state_kernel` sums each segment's keys into a local state `S = sum_j exp(ck_j - c_end) P_j^T v_j`
(with `z`, the sums of P, of valid v and the count of valid keys), the launcher turns local states into the
state before each segment (a prefix with rescaling, favor.py), and `favor_fwd_kernel` walks one segment in
chunks of BLOCK_T from that state, adding in-chunk terms and updating the state as `c` grows. Causal work is
indexed by absolute positions: query row `r` of batch `b` sits at `q_off[b] + r`, key `j` at `j`. Partial
num/den per feature block are summed by the launcher.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .target import target

FAVOR, RELU, ELU1 = 0, 1, 2


@triton.jit
def _features(x, wt, c, scale_x, KIND: tl.constexpr, EPS_Q, PREC: tl.constexpr):
    """phi of a chunk: x [BT, BD] rows and wt [BD, BF] (a W^T block) in the input dtype (products on
    the tensor cores in that dtype, exact in the float32 accumulator; upcast under PREC "ieee"), c [BT]."""
    if PREC == "ieee":
        u = tl.dot(x.to(tl.float32), wt.to(tl.float32), input_precision="ieee") * scale_x
    else:
        u = tl.dot(x, wt, input_precision=PREC) * scale_x
    if KIND == 0:
        xs = x.to(tl.float32) * scale_x
        h = tl.sum(xs * xs, 1) * 0.5
        return tl.exp(u - h[:, None] - c[:, None]) + EPS_Q
    elif KIND == 1:
        return tl.maximum(u, 0.0) + EPS_Q
    else:
        return tl.where(u > 0, u + 1.0, tl.exp(tl.minimum(u, 0.0)))


@triton.jit
def _slope(phi, KIND: tl.constexpr, EPS):
    """dphi/du from phi itself (zero where phi was masked to zero): e = phi - eps for FAVOR+, [u > 0] for relu,
    min(phi, 1) for elu+1; recomputing it keeps one tile fewer alive."""
    if KIND == 0:
        return tl.where(phi > 0, phi - EPS, 0.0)
    elif KIND == 1:
        return (phi > EPS).to(tl.float32)
    else:
        return tl.minimum(phi, 1.0)


@triton.jit
def _rows(X, r, ok, DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Rows `r` (where `ok`) of a contiguous `[*, DIM]` matrix as `[len(r), BLOCK]` in its dtype."""
    offs = tl.arange(0, BLOCK)
    return tl.load(X + r[:, None] * DIM + offs[None, :], mask=ok[:, None] & (offs[None, :] < DIM), other=0.0)


@triton.jit
def _wt(W, fb, M, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """(W^T block [BD, BF] in W's dtype, feature mask [BF]) of feature block `fb`."""
    f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    wt = tl.load(W + f[None, :] * D + offs_d[:, None], mask=(f[None, :] < M) & (offs_d[:, None] < D), other=0.0)
    return wt, f < M


@triton.jit
def _features_of(x, valid, c, fmask, wt, scale_x, KIND: tl.constexpr, EPS, PREC: tl.constexpr):
    """Features [BT, BF] of rows `x` (zero where not `valid` or outside the features)."""
    phi = _features(x, wt, c, scale_x, KIND, EPS, PREC)
    return tl.where(valid[:, None] & fmask[None, :], phi, 0.0)


@triton.jit
def _key_rows(K, V, CK, KPM, bh, b, t, in_t, NK, P, HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Key rows [BT, BD] (input dtype), values [BT, BDV] (float32), stabilisers ck [BT] and validity [BT] of
    keys `t` (`in_t`: inside the sequence)."""
    bh64 = bh.to(tl.int64)
    kx = _rows(K + bh64 * NK * D, t, in_t, D, BLOCK_D)
    v = _rows(V + bh64 * NK * DV, t, in_t, DV, BLOCK_DV).to(tl.float32)
    ck = tl.load(CK + bh64 * P + t, mask=in_t, other=0.0)
    valid = in_t
    if HAS_KPM:
        valid = valid & (tl.load(KPM + b * NK + t, mask=in_t, other=1) == 0)
    return kx, v, ck, valid


@triton.jit
def _weight_tile(ck_row, ck_col, in_row, valid_col, row_pos, col_pos):
    """exp(ck_col - ck_row) where col <= row (both real), else 0: the causal decay between a chunk's tokens."""
    ok = (col_pos[None, :] <= row_pos[:, None]) & in_row[:, None] & valid_col[None, :]
    return tl.where(ok, tl.exp(tl.where(ok, ck_col[None, :] - ck_row[:, None], 0.0)), 0.0), ok


@triton.jit
def _matrix(X, row, R: tl.constexpr, C: tl.constexpr):
    """Matrix `row` of a buffer of float32 `[R, C]` matrices (C = 1: vectors)."""
    if C == 1:
        return tl.load(X + row * R + tl.arange(0, R))
    else:
        return tl.load(X + (row * R + tl.arange(0, R)[:, None]) * C + tl.arange(0, C)[None, :])


@triton.jit
def _put(X, row, val, R: tl.constexpr, C: tl.constexpr):
    if C == 1:
        tl.store(X + row * R + tl.arange(0, R), val)
    else:
        tl.store(X + (row * R + tl.arange(0, R)[:, None]) * C + tl.arange(0, C)[None, :], val)


@triton.jit
def favor_state_kernel(K, V, W, CK, KPM, HS, HZ, HV, HN, S, Z, VS, NS, NK, P, M, H, SEG, scale_x, EPS_R,
                       KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr,
                       DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, fb, s): the keys of segment s of [0, P), walked in chunks from a zero state. Causal: before
    each chunk c the running local state goes to HS/HZ/HV/HN[c] (relative to ck at position c*BT - 1); at the
    end the segment's total goes to S/Z/VS/NS[s] (relative to ck at its last position, or the one constant)."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_bh, nf = tl.num_programs(0), tl.num_programs(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo = s * SEG
    hi = tl.minimum(lo + SEG, P)
    c_run = tl.load(CK + bh64 * P + tl.maximum(lo - 1, 0))
    St = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    vs = tl.zeros([BLOCK_DV], tl.float32)
    ns = tl.zeros([1], tl.float32)
    end = hi if CAUSAL else tl.minimum(hi, NK)
    for t0 in range(lo, end, BLOCK_T):
        if CAUSAL:
            row = (bh + (t0 // BLOCK_T) * n_bh).to(tl.int64)
            _put(HS, row * nf + fb, St, BLOCK_F, BLOCK_DV)
            _put(HZ, row * nf + fb, z, BLOCK_F, 1)
            if fb == 0:
                _put(HV, row, vs, BLOCK_DV, 1)
                _put(HN, row, ns, 1, 1)
        t = t0 + tl.arange(0, BLOCK_T)
        kx, v, ck, valid = _key_rows(K, V, CK, KPM, bh, b, t, (t < hi) & (t < NK), NK, P, HAS_KPM, D, DV, BLOCK_D,
                                     BLOCK_DV)
        p = _features_of(kx, valid, ck, fmask, wt, scale_x, KIND, EPS_R, PREC)
        if CAUSAL:
            c_end = tl.load(CK + bh64 * P + tl.minimum(t0 + BLOCK_T, P) - 1)
            p = p * tl.where(valid, tl.exp(tl.where(valid, ck - c_end, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_run - c_end)
            St = St * rescale
            z = z * rescale
            c_run = c_end
        St += tl.dot(tl.trans(p), v, input_precision=PREC)
        z += tl.sum(p, 0)
        vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
        ns += tl.sum(valid.to(tl.float32), 0)
    row = s.to(tl.int64) * n_bh + bh
    _put(S, row * nf + fb, St, BLOCK_F, BLOCK_DV)
    _put(Z, row * nf + fb, z, BLOCK_F, 1)
    if fb == 0:
        _put(VS, row, vs, BLOCK_DV, 1)
        _put(NS, row, ns, 1, 1)


@triton.jit(do_not_specialize=["q_off"])
def favor_fwd_kernel(Q, K, V, W, CQ, CK, KPM, HS, HZ, HV, HN, S, Z, VS, NS, CPREV, QOFF, O, DEN, q_off, c0, NQ, NK, P,
                     M, NF, N_SEG, H, SEG, scale_x, EPS_Q, EPS_R, EPS_K, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     PREC: tl.constexpr):
    """Program (c, bh): out and den of the queries in chunk c0 + c (positions when causal, rows otherwise), summed
    over the feature blocks: the chunk's state (segment-local part plus the segment's incoming state) and, when
    causal, the in-chunk terms."""
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
    num = tl.zeros([BLOCK_T, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_T], tl.float32)
    sphi = tl.zeros([BLOCK_T], tl.float32)
    a = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    if CAUSAL:
        kx, v, ck, valid = _key_rows(K, V, CK, KPM, bh, b, t, (t < NK) & (t < P), NK, P, HAS_KPM, D, DV, BLOCK_D,
                                     BLOCK_DV)
        ckq = tl.load(CK + bh64 * P + t, mask=t < P, other=0.0)
        c_prev = tl.load(CK + bh64 * P + tl.maximum(t0 - 1, 0))
        seg = t0 // SEG
        w_seg = tl.exp(tl.load(CPREV + bh64 * N_SEG + seg) - c_prev)
        row = c.to(tl.int64) * n_bh + bh
        srow = seg.to(tl.int64) * n_bh + bh
    for fb in range(0, NF):
        wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
        phi = _features_of(qx, in_q, cq, fmask, wt, scale_x, KIND, EPS_Q, PREC)
        if CAUSAL:
            Hc = _matrix(HS, row * NF + fb, BLOCK_F, BLOCK_DV) + w_seg * _matrix(S, srow * NF + fb, BLOCK_F,
                                                                                  BLOCK_DV)
            zc = _matrix(HZ, row * NF + fb, BLOCK_F, 1) + w_seg * _matrix(Z, srow * NF + fb, BLOCK_F, 1)
            p = _features_of(kx, valid, ck, fmask, wt, scale_x, KIND, EPS_R, PREC)
            a += tl.dot(phi, tl.trans(p), input_precision=PREC)
        else:
            Hc = _matrix(S, bh64 * NF + fb, BLOCK_F, BLOCK_DV)
            zc = _matrix(Z, bh64 * NF + fb, BLOCK_F, 1)
        num += tl.dot(phi, Hc, input_precision=PREC)
        den += tl.sum(phi * zc[None, :], 1)
        sphi += tl.sum(phi, 1)
    if CAUSAL:
        vs = _matrix(HV, row, BLOCK_DV, 1) + _matrix(VS, srow, BLOCK_DV, 1)
        ns = tl.load(HN + row) + tl.load(NS + srow)
        sc = tl.where(in_q, tl.exp(tl.where(in_q, c_prev - ckq, 0.0)), 0.0)
        num = num * sc[:, None]
        den = den * sc
        decay, ok = _weight_tile(ckq, ck, in_q, valid, t, t)
        a = a * decay + tl.where(ok, EPS_K * sphi[:, None], 0.0)
        num += tl.dot(a, v, input_precision=PREC)
        den += tl.sum(a, 1)
    else:
        vs = _matrix(VS, bh64, BLOCK_DV, 1)
        ns = tl.load(NS + bh64)
    num += EPS_K * sphi[:, None] * vs[None, :]
    den += EPS_K * sphi * ns
    out = tl.where((den > 0)[:, None], num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = bh64 * NQ + r
    tl.store(O + rows[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=in_q[:, None] & (offs_dv[None, :] < DV))
    tl.store(DEN + rows, den, mask=in_q)


@triton.jit
def favor_stats_kernel(X, W, OUT, ARG, N, M, scale_x, D: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """OUT[bh, t] = max_f (x'_t W^T)_f, the FAVOR+ stabiliser of each token, and ARG its feature f."""
    bh = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < N
    x = _rows(X + bh.to(tl.int64) * N * D, t, in_t, D, BLOCK_D)
    if PREC == "ieee":
        x = x.to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_T], tl.int32)
    for f0 in range(0, M, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        wt = tl.load(W + f[None, :] * D + offs_d[:, None], mask=(f[None, :] < M) & (offs_d[:, None] < D), other=0.0)
        if PREC == "ieee":
            wt = wt.to(tl.float32)
        u = tl.where((f < M)[None, :], tl.dot(x, wt, input_precision=PREC) * scale_x, float("-inf"))
        top = tl.max(u, 1)
        arg = tl.where(top > best, f0 + tl.argmax(u, 1).to(tl.int32), arg)
        best = tl.maximum(best, top)
    tl.store(OUT + bh.to(tl.int64) * N + t, best, mask=in_t)
    tl.store(ARG + bh.to(tl.int64) * N + t, arg, mask=in_t)


# ---------------------------------------------------------------------------------------------- launchers
def blocks(n: int, m: int, device, head_dim: int = 64) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_F): tokens per chunk, features per block. Chunks of 64 on Hopper (wgmma needs 64 rows per
    warpgroup), 32 on Ampere and in the interpreter (mma.sync keeps fewer registers per tile); feature blocks of
    64, 32 above D = 64 (the `[D, features]` tiles must fit shared memory and registers)."""
    t = target(device)
    cap = 32 if t.interpreter or t.arch < 90 else 64
    fcap = 32 if head_dim > 64 and not t.interpreter else 64
    return min(cap, max(16, triton.next_power_of_2(n))), min(fcap, max(16, triton.next_power_of_2(m)))


# warps per kernel on a GPU: what keeps each free of register spills at 64-token chunks (see aot.py)
WARPS = {"state": 8, "fwd": 8, "rstate": 8, "dq": 4, "dv": 8, "dk": 4}


def launch(opts: dict, kernel: str) -> dict:
    """The launch options of one kernel: the shared constexprs and that kernel's warps."""
    out = {k: v for k, v in opts.items() if k != "warps"}
    if "warps" in opts:
        out["num_warps"] = opts["warps"][kernel]
    return out


def precision(dtype, device) -> str:
    """TF32 for the fp32 feature and state products of low-precision inputs (and fp32 inputs where torch allows
    TF32); exact fp32 products otherwise and in the interpreter."""
    if target(device).interpreter or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def eps_values(kind: int, eps: float) -> tuple[float, float, float]:
    """(EPS_Q added to query features, EPS_R added to key features, EPS_K the key eps kept out of the decay)."""
    if kind == FAVOR:
        return eps, 0.0, eps
    if kind == RELU:
        return eps, eps, 0.0
    return 0.0, 0.0, 0.0


def _bd(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def favor_stats(x, w, scale_x: float):
    """(max, argmax) over features of `x' W^T` per token: float32 and int64 `[B, H, N]`."""
    B, H, N, D = x.shape
    out = torch.empty(B, H, N, dtype=torch.float32, device=x.device)
    arg = torch.zeros(B, H, N, dtype=torch.int32, device=x.device)
    bt, bf = blocks(N, w.shape[0], x.device)
    if N and B * H:
        favor_stats_kernel[(B * H, triton.cdiv(N, bt))](x, w, out, arg, N, w.shape[0], scale_x, D=D, BLOCK_T=bt,
                                                        BLOCK_F=bf, BLOCK_D=_bd(D), PREC=precision(x.dtype, x.device))
    return out, arg.long()


def meta(q, k, v, w, kind: int, causal: bool, kpm) -> dict:
    """Constexprs shared by the forward and backward kernels, and the warps of each (`launch`)."""
    bt, bf = blocks(max(q.shape[2], k.shape[2]), w.shape[0], q.device, max(q.shape[3], v.shape[3]))
    out = dict(KIND=kind, CAUSAL=causal, HAS_KPM=kpm is not None, D=q.shape[3], DV=v.shape[3], BLOCK_T=bt,
               BLOCK_F=bf, BLOCK_D=_bd(q.shape[3]), BLOCK_DV=_bd(v.shape[3]), PREC=precision(q.dtype, q.device))
    if not target(q.device).interpreter:
        out["warps"] = WARPS
        if max(q.shape[3], v.shape[3]) > 64:
            out["num_stages"] = 1           # no software pipelining: the D = 128 tiles fill shared memory
    return out


def key_states(k, v, w, ck, kpm, P: int, seg: int, n_seg: int, scale_x: float, eps_r: float, opts: dict):
    """Walk the keys of every segment: (per-chunk local states HS `[n_chunks, BH, nf, BF, BDV]`, HZ, HV, HN when
    causal, else None) and the segments' totals S `[n_seg, BH, nf, BF, BDV]`, Z `[.., BF]`, VS `[n_seg, BH,
    BDV]`, NS `[n_seg, BH]`; `ck` `[B, H, P]`: stabilisers at positions [0, P) (causal) or of the keys."""
    B, H, NK, _ = k.shape
    bf, bdv, bt = opts["BLOCK_F"], opts["BLOCK_DV"], opts["BLOCK_T"]
    nf = triton.cdiv(w.shape[0], bf)
    f32 = dict(dtype=torch.float32, device=k.device)
    S, Z = torch.empty(n_seg, B * H, nf, bf, bdv, **f32), torch.empty(n_seg, B * H, nf, bf, **f32)
    VS, NS = torch.empty(n_seg, B * H, bdv, **f32), torch.empty(n_seg, B * H, **f32)
    chunks = None
    if opts["CAUSAL"]:
        nc = triton.cdiv(P, bt)
        chunks = (torch.empty(nc, B * H, nf, bf, bdv, **f32), torch.empty(nc, B * H, nf, bf, **f32),
                  torch.empty(nc, B * H, bdv, **f32), torch.empty(nc, B * H, **f32))
    favor_state_kernel[(B * H, nf, n_seg)](k, v, w, ck, kpm if kpm is not None else ck, *(chunks or (S, Z, VS, NS)),
                                           S, Z, VS, NS, NK, P, w.shape[0], H, seg, scale_x, eps_r,
                                           **launch(opts, "state"))
    return chunks, (S, Z, VS, NS)


def favor_fwd(q, k, v, w, cq, ck, kpm, chunks, states, c_prev, offsets, P: int, seg: int, kind: int, eps: float,
              scale_x: float, opts: dict):
    """(out `[B, H, N_q, D_v]` in q's dtype, den `[B, H, N_q]` float32): one program per chunk of queries, from
    the per-chunk states `chunks` and the segments' incoming `states` (`c_prev [BH, n_seg]` their references)
    when causal, or the total `states` (positions [0, P) when causal, rows otherwise)."""
    B, H, NQ, _ = q.shape
    NK, DV = k.shape[2], v.shape[3]
    bt = opts["BLOCK_T"]
    nf = triton.cdiv(w.shape[0], opts["BLOCK_F"])
    out = torch.empty(B, H, NQ, DV, dtype=q.dtype, device=q.device)
    den = torch.empty(B, H, NQ, dtype=torch.float32, device=q.device)
    causal = opts["CAUSAL"]
    c0 = min(offsets.values, default=0) // bt if causal else 0        # chunks before the first query: none
    n = triton.cdiv(P, bt) - c0
    favor_fwd_kernel[(n, B * H)](
        q, k, v, w, cq, ck, kpm if kpm is not None else cq, *(chunks or states), *states, c_prev,
        offsets.tensor(cq), out, den, offsets.scalar if causal else 0, c0, NQ, NK, P, w.shape[0], nf,
        c_prev.shape[-1], H, seg, scale_x, *eps_values(kind, eps), ROW_OFFSETS=offsets.per_row and causal,
        **launch(opts, "fwd"))
    return out, den
