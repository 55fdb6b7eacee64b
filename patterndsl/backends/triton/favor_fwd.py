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
    """(phi, dphi/du) of a chunk: x [BT, BD] rows and wt [BD, BF] (a W^T block) in the input dtype (products on
    the tensor cores in that dtype, exact in the float32 accumulator; upcast under PREC "ieee"), c [BT]."""
    if PREC == "ieee":
        u = tl.dot(x.to(tl.float32), wt.to(tl.float32), input_precision="ieee") * scale_x
    else:
        u = tl.dot(x, wt, input_precision=PREC) * scale_x
    if KIND == 0:
        xs = x.to(tl.float32) * scale_x
        h = tl.sum(xs * xs, 1) * 0.5
        e = tl.exp(u - h[:, None] - c[:, None])
        return e + EPS_Q, e
    elif KIND == 1:
        return tl.maximum(u, 0.0) + EPS_Q, (u > 0).to(tl.float32)
    else:
        e = tl.exp(tl.minimum(u, 0.0))
        return tl.where(u > 0, u + 1.0, e), tl.where(u > 0, 1.0, e)


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
def _keys(K, V, CK, KPM, bh, b, t, in_t, NK, P, fmask, wt, scale_x, KIND: tl.constexpr, EPS_R,
          HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Key features P [BT, BF] (zero on invalid keys), their u-derivative, rows [BT, BD] (input dtype), values
    [BT, BDV] (float32), stabilisers ck [BT] and validity [BT] of keys `t` (`in_t`: inside the sequence)."""
    bh64 = bh.to(tl.int64)
    kx = _rows(K + bh64 * NK * D, t, in_t, D, BLOCK_D)
    v = _rows(V + bh64 * NK * DV, t, in_t, DV, BLOCK_DV).to(tl.float32)
    ck = tl.load(CK + bh64 * P + t, mask=in_t, other=0.0)
    valid = in_t
    if HAS_KPM:
        valid = valid & (tl.load(KPM + b * NK + t, mask=in_t, other=1) == 0)
    p, dp = _features(kx, wt, ck, scale_x, KIND, EPS_R, PREC)
    keep = valid[:, None] & fmask[None, :]
    return tl.where(keep, p, 0.0), tl.where(keep, dp, 0.0), kx, v, ck, valid


@triton.jit
def _queries(Q, CQ, bh, r, in_q, NQ, fmask, wt, scale_x, KIND: tl.constexpr, EPS_Q, D: tl.constexpr,
             BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Query features phi [BT, BF] of rows `r` (zero outside `in_q` and the features), their u-derivative, rows."""
    bh64 = bh.to(tl.int64)
    qx = _rows(Q + bh64 * NQ * D, r, in_q, D, BLOCK_D)
    cq = tl.load(CQ + bh64 * NQ + r, mask=in_q, other=0.0)
    phi, dphi = _features(qx, wt, cq, scale_x, KIND, EPS_Q, PREC)
    keep = in_q[:, None] & fmask[None, :]
    return tl.where(keep, phi, 0.0), tl.where(keep, dphi, 0.0), qx


@triton.jit
def _weight_tile(ck_row, ck_col, in_row, valid_col, row_pos, col_pos):
    """exp(ck_col - ck_row) where col <= row (both real), else 0: the causal decay between a chunk's tokens."""
    ok = (col_pos[None, :] <= row_pos[:, None]) & in_row[:, None] & valid_col[None, :]
    return tl.where(ok, tl.exp(tl.where(ok, ck_col[None, :] - ck_row[:, None], 0.0)), 0.0), ok


@triton.jit
def _segment(s, SEG, LENGTH):
    lo = s * SEG
    return lo, tl.minimum(lo + SEG, LENGTH)


@triton.jit
def _state_index(bh, fb, s):
    """Row of a `[n_seg, BH, nf, ...]` state buffer."""
    return (s.to(tl.int64) * tl.num_programs(0) + bh) * tl.num_programs(1) + fb


@triton.jit
def favor_state_kernel(K, V, W, CK, KPM, S, Z, VS, NS, NK, P, M, H, SEG, scale_x, EPS_R,
                       KIND: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, D: tl.constexpr,
                       DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, fb, s): the keys of segment s of [0, P) summed into a local state, relative to the
    stabiliser at the segment's last position (causal) or the one constant (not causal)."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = bh // H
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo, hi = _segment(s, SEG, P)
    c_end = tl.load(CK + bh.to(tl.int64) * P + tl.maximum(hi - 1, 0))
    St = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    z = tl.zeros([BLOCK_F], tl.float32)
    vs = tl.zeros([BLOCK_DV], tl.float32)
    ns = tl.zeros([1], tl.float32)
    for t0 in range(lo, tl.minimum(hi, NK), BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < tl.minimum(hi, NK)
        p, _, _, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, in_t, NK, P, fmask, wt, scale_x, KIND, EPS_R,
                                      HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
        if CAUSAL:
            p = p * tl.where(valid, tl.exp(tl.where(valid, ck - c_end, 0.0)), 0.0)[:, None]
        St += tl.dot(tl.trans(p), v, input_precision=PREC)
        z += tl.sum(p, 0)
        vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
        ns += tl.sum(valid.to(tl.float32), 0)
    row = _state_index(bh, fb, s)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(S + (row * BLOCK_F + offs_f[:, None]) * BLOCK_DV + offs_dv[None, :], St)
    tl.store(Z + row * BLOCK_F + offs_f, z)
    if fb == 0:
        seg_row = s.to(tl.int64) * tl.num_programs(0) + bh
        tl.store(VS + seg_row * BLOCK_DV + offs_dv, vs)
        tl.store(NS + seg_row + tl.arange(0, 1), ns)


@triton.jit
def _load_state(S, Z, VS, NS, bh, fb, s, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = _state_index(bh, fb, s)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    seg_row = s.to(tl.int64) * tl.num_programs(0) + bh
    return (tl.load(S + (row * BLOCK_F + offs_f[:, None]) * BLOCK_DV + offs_dv[None, :]),
            tl.load(Z + row * BLOCK_F + offs_f), tl.load(VS + seg_row * BLOCK_DV + offs_dv), tl.load(NS + seg_row))


@triton.jit(do_not_specialize=["q_off"])
def favor_fwd_kernel(Q, K, V, W, CQ, CK, KPM, S, Z, VS, NS, CPREV, QOFF, NUM, DEN, q_off, NQ, NK, P, M, H, SEG,
                     scale_x, EPS_Q, EPS_R, EPS_K, KIND: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KPM: tl.constexpr, ROW_OFFSETS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     PREC: tl.constexpr):
    """Program (bh, fb, s): partial num/den (feature block fb) of the queries in segment s, from the state
    before the segment (causal: positions, query row = position - q_off; not causal: rows, one total state)."""
    bh, fb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = bh // H
    if ROW_OFFSETS:
        q_off = tl.load(QOFF + b)
    wt, fmask = _wt(W, fb, M, D, BLOCK_D, BLOCK_F)
    lo, hi = _segment(s, SEG, P)
    hi = tl.minimum(hi, q_off + NQ)                    # nothing after the last query matters
    hi = tl.where(hi > q_off, hi, lo)                  # nor a segment wholly before the first
    if CAUSAL:
        St, z, vs, ns = _load_state(S, Z, VS, NS, bh, fb, s, BLOCK_F, BLOCK_DV)
        c_prev = tl.load(CPREV + bh.to(tl.int64) * tl.num_programs(2) + s)
    else:
        St, z, vs, ns = _load_state(S, Z, VS, NS, bh, fb, s * 0, BLOCK_F, BLOCK_DV)
        c_prev = 0.0
    offs_dv = tl.arange(0, BLOCK_DV)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        r = t - q_off
        in_q = (r >= 0) & (r < NQ) & (t < hi)
        phi, _, _ = _queries(Q, CQ, bh, r, in_q, NQ, fmask, wt, scale_x, KIND, EPS_Q, D, BLOCK_D, PREC)
        sphi = tl.sum(phi, 1)
        if CAUSAL:
            p, _, _, v, ck, valid = _keys(K, V, CK, KPM, bh, b, t, (t < NK) & (t < hi), NK, P, fmask, wt, scale_x,
                                          KIND, EPS_R, HAS_KPM, D, DV, BLOCK_D, BLOCK_DV, PREC)
            ckq = tl.load(CK + bh.to(tl.int64) * P + t, mask=t < P, other=0.0)
            sc = tl.where(in_q, tl.exp(tl.where(in_q, c_prev - ckq, 0.0)), 0.0)
            num = sc[:, None] * tl.dot(phi, St, input_precision=PREC) + EPS_K * sphi[:, None] * vs[None, :]
            den = sc * tl.sum(phi * z[None, :], 1) + EPS_K * sphi * ns
            decay, ok = _weight_tile(ckq, ck, in_q, valid, t, t)
            a = tl.dot(phi, tl.trans(p), input_precision=PREC) * decay + tl.where(ok, EPS_K * sphi[:, None], 0.0)
            num += tl.dot(a, v, input_precision=PREC)
            den += tl.sum(a, 1)
            c_end = tl.load(CK + bh.to(tl.int64) * P + tl.minimum(t0 + BLOCK_T, P) - 1)
            pe = p * tl.where(valid, tl.exp(tl.where(valid, ck - c_end, 0.0)), 0.0)[:, None]
            rescale = tl.exp(c_prev - c_end)
            St = St * rescale + tl.dot(tl.trans(pe), v, input_precision=PREC)
            z = z * rescale + tl.sum(pe, 0)
            vs += tl.sum(tl.where(valid[:, None], v, 0.0), 0)
            ns += tl.sum(valid.to(tl.float32), 0)
            c_prev = c_end
        else:
            num = tl.dot(phi, St, input_precision=PREC) + EPS_K * sphi[:, None] * vs[None, :]
            den = tl.sum(phi * z[None, :], 1) + EPS_K * sphi * ns
        rows = (fb * tl.num_programs(0) + bh).to(tl.int64) * NQ + r
        tl.store(NUM + rows[:, None] * BLOCK_DV + offs_dv[None, :], num, mask=in_q[:, None])
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
def blocks(n: int, m: int, device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_F): tokens per chunk, features per program."""
    cap = 32 if target(device).interpreter else 64
    return min(cap, max(16, triton.next_power_of_2(n))), min(cap, max(16, triton.next_power_of_2(m)))


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
    """Constexprs and warps shared by the forward and backward kernels (8 warps on a GPU: the fp32 feature and
    state tiles of the walks need the registers)."""
    bt, bf = blocks(max(q.shape[2], k.shape[2]), w.shape[0], q.device)
    out = dict(KIND=kind, CAUSAL=causal, HAS_KPM=kpm is not None, D=q.shape[3], DV=v.shape[3], BLOCK_T=bt,
               BLOCK_F=bf, BLOCK_D=_bd(q.shape[3]), BLOCK_DV=_bd(v.shape[3]), PREC=precision(q.dtype, q.device))
    if not target(q.device).interpreter:
        out["num_warps"] = 8
    return out


def key_states(k, v, w, ck, kpm, P: int, seg: int, n_seg: int, scale_x: float, eps_r: float, opts: dict):
    """Local states of every segment of keys: S `[n_seg, BH, nf, BF, BDV]`, z `[n_seg, BH, nf, BF]`, sums of
    valid v `[n_seg, BH, BDV]` and valid counts `[n_seg, BH]`; `ck` `[B, H, P]`: positions [0, P) (causal) or
    keys (P = N_k)."""
    B, H, NK, _ = k.shape
    bf, bdv = opts["BLOCK_F"], opts["BLOCK_DV"]
    nf = triton.cdiv(w.shape[0], bf)
    f32 = dict(dtype=torch.float32, device=k.device)
    S, Z = torch.empty(n_seg, B * H, nf, bf, bdv, **f32), torch.empty(n_seg, B * H, nf, bf, **f32)
    VS, NS = torch.empty(n_seg, B * H, bdv, **f32), torch.empty(n_seg, B * H, **f32)
    favor_state_kernel[(B * H, nf, n_seg)](k, v, w, ck, kpm if kpm is not None else ck, S, Z, VS, NS, NK, P,
                                           w.shape[0], H, seg, scale_x, eps_r, **opts)
    return S, Z, VS, NS


def favor_fwd(q, k, v, w, cq, ck, kpm, states, c_prev, offsets, P: int, seg: int, n_seg: int, kind: int,
              eps: float, scale_x: float, opts: dict):
    """(num `[B, H, N_q, D_v]`, den `[B, H, N_q]`) float32, summed over feature blocks, from the states before
    each segment (`states`, `c_prev [BH, n_seg]`; favor.py). Causal work runs over positions [0, P)."""
    B, H, NQ, _ = q.shape
    NK, DV = k.shape[2], v.shape[3]
    nf = triton.cdiv(w.shape[0], opts["BLOCK_F"])
    num = torch.empty(nf, B * H, NQ, opts["BLOCK_DV"], dtype=torch.float32, device=q.device)
    den = torch.empty(nf, B * H, NQ, dtype=torch.float32, device=q.device)
    favor_fwd_kernel[(B * H, nf, n_seg)](
        q, k, v, w, cq, ck, kpm if kpm is not None else cq, *states, c_prev, offsets.tensor(cq), num, den,
        offsets.scalar if opts["CAUSAL"] else 0, NQ, NK, P, w.shape[0], H, seg, scale_x, *eps_values(kind, eps),
        ROW_OFFSETS=offsets.per_row and opts["CAUSAL"], **opts)
    return num.sum(0)[..., :DV].reshape(B, H, NQ, DV), den.sum(0).reshape(B, H, NQ)
