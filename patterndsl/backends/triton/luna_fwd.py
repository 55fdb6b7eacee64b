"""Causal Luna (nested attention through l packed queries), forward, in chunked states (the semantics are
patterndsl/backends/reference/nested.py's).

With `s = d^-1/2`, `a_j = softplus_beta(s c_j . p)` (zero on padded keys, `beta = ln 2`) and `inv_t = 1/n_t`:

    logits_t = inv_t * s q_t . Kc_t,  Kc_t = sum_{j <= t} k_j a_j^T   [D, l]
    out_t    = inv_t * softmax(logits_t) . Vc_t,  Vc_t = sum_{j <= t} a_j^T v_j   [l, D_v]

The sequence is cut into segments that run in parallel (scan.py): `luna_state_kernel` sums each segment's
`k^T a` and `a^T v` (plain sums, no stabiliser), the launcher turns them into the states before each segment
(an exclusive prefix), and `luna_fwd_kernel` walks one segment in chunks of BLOCK_T from its state; inside a
chunk the `j <= t` terms are masked matrix products.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .target import target

BETA = math.log(2.0)


@triton.jit
def _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_: tl.constexpr, HAS_KPM: tl.constexpr,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, PREC: tl.constexpr):
    """(a [BT, BL], x = s c.p^T, c [BT, BD], p [BL, BD], valid [BT]) of one chunk."""
    bh64 = bh.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    c = tl.load(C + bh64 * N * D + t[:, None] * D + offs_d[None, :], mask=in_t[:, None] & (offs_d[None, :] < D),
                other=0.0).to(tl.float32)
    p = tl.load(P + bh64 * L * D + offs_l[:, None] * D + offs_d[None, :],
                mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    x = tl.dot(c, tl.trans(p), input_precision=PREC) * s
    bx = x * BETA_
    a = (tl.maximum(bx, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(bx)))) / BETA_
    valid = in_t
    if HAS_KPM:
        valid = valid & (tl.load(KPM + b * N + t, mask=in_t, other=1) == 0)
    a = tl.where(valid[:, None] & (offs_l[None, :] < L), a, 0.0)
    return a, x, c, p, valid


@triton.jit
def _rows(X, bh, t, in_t, N, D: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(X + bh.to(tl.int64) * N * D + t[:, None] * D + offs_d[None, :],
                   mask=in_t[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _attn(q, k, a, Kc, inv, t, L, s, BLOCK_L: tl.constexpr, PREC: tl.constexpr):
    """softmax_l of the logits of a chunk [BT, BL], and the causal mask [t, j]."""
    causal = t[None, :] <= t[:, None]
    qk = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PREC) * s, 0.0)
    logits = (tl.dot(q, Kc, input_precision=PREC) * s + tl.dot(qk, a, input_precision=PREC)) * inv[:, None]
    logits = tl.where((tl.arange(0, BLOCK_L) < L)[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, 1)[:, None])
    return e / tl.sum(e, 1)[:, None], causal


@triton.jit
def _matrix(X, row, R: tl.constexpr, C: tl.constexpr):
    """Row `row` of a buffer of `[R, C]` float32 matrices."""
    return tl.load(X + (row * R + tl.arange(0, R)[:, None]) * C + tl.arange(0, C)[None, :])


@triton.jit
def _put_matrix(X, row, val, R: tl.constexpr, C: tl.constexpr):
    tl.store(X + (row * R + tl.arange(0, R)[:, None]) * C + tl.arange(0, C)[None, :], val)


@triton.jit
def luna_state_kernel(K, V, P, C, KPM, KC, VC, N, L, H, SEG, s, BETA_: tl.constexpr, HAS_KPM: tl.constexpr,
                      D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, g): `sum k^T a` and `sum a^T v` over segment g."""
    bh, g = tl.program_id(0), tl.program_id(1)
    b = bh // H
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    Kc = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    Vc = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < hi
        a, _, _, _, _ = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L,
                                        PREC)
        Kc += tl.dot(tl.trans(_rows(K, bh, t, in_t, N, D, BLOCK_D)), a, input_precision=PREC)
        Vc += tl.dot(tl.trans(a), _rows(V, bh, t, in_t, N, DV, BLOCK_DV), input_precision=PREC)
    row = g.to(tl.int64) * tl.num_programs(0) + bh
    _put_matrix(KC, row, Kc, BLOCK_D, BLOCK_L)
    _put_matrix(VC, row, Vc, BLOCK_L, BLOCK_DV)


@triton.jit
def luna_fwd_kernel(Q, K, V, P, C, KPM, INV, KC, VC, O, N, L, H, SEG, s, BETA_: tl.constexpr,
                    HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, g): the outputs of segment g, walked from the states before it."""
    bh, g = tl.program_id(0), tl.program_id(1)
    b = bh // H
    row = g.to(tl.int64) * tl.num_programs(0) + bh
    Kc = _matrix(KC, row, BLOCK_D, BLOCK_L)
    Vc = _matrix(VC, row, BLOCK_L, BLOCK_DV)
    offs_dv = tl.arange(0, BLOCK_DV)
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < hi
        a, _, _, _, _ = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L,
                                        PREC)
        q = _rows(Q, bh, t, in_t, N, D, BLOCK_D)
        k = _rows(K, bh, t, in_t, N, D, BLOCK_D)
        v = _rows(V, bh, t, in_t, N, DV, BLOCK_DV)
        inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
        attn, causal = _attn(q, k, a, Kc, inv, t, L, s, BLOCK_L, PREC)
        aa = tl.where(causal, tl.dot(attn, tl.trans(a), input_precision=PREC), 0.0)
        out = (tl.dot(attn, Vc, input_precision=PREC) + tl.dot(aa, v, input_precision=PREC)) * inv[:, None]
        tl.store(O + bh.to(tl.int64) * N * DV + t[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=in_t[:, None] & (offs_dv[None, :] < DV))
        Kc += tl.dot(tl.trans(k), a, input_precision=PREC)
        Vc += tl.dot(tl.trans(a), v, input_precision=PREC)


# ----------------------------------------------------------------------------------------------- launcher
def luna_meta(q, v, p) -> dict:
    """Block sizes, warps, pipeline depth and dot precision shared by the forward and backward kernels.

    Chunks of 64 tokens up to l = 32, 32 above (the `[BT, l]` tiles and the states `[D, l]`, `[l, D_v]` share
    the registers); 8 warps from l = 64 and D = 128; two pipeline stages, so the shared memory of the fp32
    operand tiles fits the GPU (aot.py checks it per target)."""
    interp = target(q.device).interpreter
    bl = max(16, triton.next_power_of_2(p.shape[2]))
    bd, bdv = max(16, triton.next_power_of_2(q.shape[3])), max(16, triton.next_power_of_2(v.shape[3]))
    big = bl >= 64 or max(bd, bdv) >= 128
    opts = dict(BLOCK_T=32 if interp or bl > 32 else 64, BLOCK_L=bl, BLOCK_D=bd, BLOCK_DV=bdv,
                PREC="ieee" if interp or (q.dtype == torch.float32 and torch.get_float32_matmul_precision()
                                          == "highest") else "tf32")
    if not interp:
        opts.update(num_warps=8 if big else 4, num_stages=2)
    return opts


def inverse_counts(key_padding_mask, B: int, N: int, device) -> torch.Tensor:
    """`1 / n_t` float32 `[B, N]`: n_t the unpadded keys j <= t (0 where there is none)."""
    if key_padding_mask is None:
        n = torch.arange(1, N + 1, device=device, dtype=torch.float32).expand(B, N)
    else:
        n = (~key_padding_mask).to(torch.float32).cumsum(-1)
    return torch.where(n > 0, 1.0 / n.clamp(min=1.0), 0.0).contiguous()


def luna_states(k, v, p, c, kpm, seg: int, n_seg: int, opts: dict):
    """Local `sum k^T a` `[n_seg, BH, BD, BL]` and `sum a^T v` `[n_seg, BH, BL, BDV]` of every segment."""
    B, H, N, D = k.shape
    f32 = dict(dtype=torch.float32, device=k.device)
    kc = torch.empty(n_seg, B * H, opts["BLOCK_D"], opts["BLOCK_L"], **f32)
    vc = torch.empty(n_seg, B * H, opts["BLOCK_L"], opts["BLOCK_DV"], **f32)
    luna_state_kernel[(B * H, n_seg)](k, v, p, c, kpm if kpm is not None else k, kc, vc, N, p.shape[2], H, seg,
                                      D ** -0.5, BETA_=BETA, HAS_KPM=kpm is not None, D=D, DV=v.shape[3], **opts)
    return kc, vc


def luna_fwd(q, k, v, p, c, kpm, inv, states, seg: int, n_seg: int, opts: dict):
    """Causal Luna forward: out `[B, H, N, D_v]` in q's dtype, from the states before each segment."""
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    luna_fwd_kernel[(B * H, n_seg)](q, k, v, p, c, kpm if kpm is not None else inv, inv, *states, out, N,
                                    p.shape[2], H, seg, D ** -0.5, BETA_=BETA, HAS_KPM=kpm is not None, D=D,
                                    DV=v.shape[3], **opts)
    return out
