"""Causal Luna (nested attention through l packed queries), forward, in chunked states (the semantics are
patterndsl/backends/reference/nested.py's).

With `s = d^-1/2`, `a_j = softplus_beta(s c_j . p)` (zero on padded keys, `beta = ln 2`) and `inv_t = 1/n_t`:

    logits_t = inv_t * s q_t . Kc_t,  Kc_t = sum_{j <= t} k_j a_j^T   [D, l]
    out_t    = inv_t * softmax(logits_t) . Vc_t,  Vc_t = sum_{j <= t} a_j^T v_j   [l, D_v]

The sequence is cut into chunks of BLOCK_T tokens and segments of chunks (scan.py): `luna_state_kernel` walks
each segment (in parallel) storing the sums `k^T a`, `v^T a` before every chunk (plain sums, no stabiliser; kept
transposed so every product has 64 rows for wgmma) and the segment's totals; the launcher turns the totals
into the sums before each segment (an exclusive prefix); `luna_fwd_kernel` runs one program per chunk from
those states, with the in-chunk `j <= t` terms as masked matrix products.
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
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, PREC: tl.constexpr,
                    L_FIRST: tl.constexpr):
    """(a [BT, BL], x = s c.p^T, c [BT, BD], p [BL, BD], valid [BT]) of one chunk."""
    bh64 = bh.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    c = tl.load(C + bh64 * N * D + t[:, None] * D + offs_d[None, :], mask=in_t[:, None] & (offs_d[None, :] < D),
                other=0.0).to(tl.float32)
    p = tl.load(P + bh64 * L * D + offs_l[:, None] * D + offs_d[None, :],
                mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    if L_FIRST:            # the packed side first: 64+ rows for wgmma with 32-token chunks
        x = tl.trans(tl.dot(p, tl.trans(c), input_precision=PREC)) * s
    else:
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
    """Matrix `row` of a buffer of `[R, C]` float32 matrices."""
    return tl.load(X + (row * R + tl.arange(0, R)[:, None]) * C + tl.arange(0, C)[None, :])


@triton.jit
def _put_matrix(X, row, val, R: tl.constexpr, C: tl.constexpr):
    tl.store(X + (row * R + tl.arange(0, R)[:, None]) * C + tl.arange(0, C)[None, :], val)


@triton.jit
def _chunk_state(XC, XS, c, bh, SEG, BLOCK_T: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """The state of chunk c: its segment-local part plus its segment's incoming (or outgoing) state."""
    n_bh = tl.num_programs(1)
    seg = (c * BLOCK_T) // SEG
    return _matrix(XC, c.to(tl.int64) * n_bh + bh, R, C) + _matrix(XS, seg.to(tl.int64) * n_bh + bh, R, C)


@triton.jit
def luna_state_kernel(K, V, P, C, KPM, KCH, VCH, KC, VC, N, L, H, SEG, s, BETA_: tl.constexpr,
                      HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
                      L_FIRST: tl.constexpr):
    """Program (bh, g): segment g walked in chunks from zero sums; before each chunk c the running `sum k^T a`
    `[BD, BL]` and `sum v^T a` `[BDV, BL]` go to KCH/VCH[c], at the end the segment's totals to KC/VC[g]."""
    bh, g = tl.program_id(0), tl.program_id(1)
    n_bh = tl.num_programs(0)
    b = bh // H
    lo = g * SEG
    hi = tl.minimum(lo + SEG, N)
    Kc = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    VcT = tl.zeros([BLOCK_DV, BLOCK_L], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        row = (bh + (t0 // BLOCK_T) * n_bh).to(tl.int64)
        _put_matrix(KCH, row, Kc, BLOCK_D, BLOCK_L)
        _put_matrix(VCH, row, VcT, BLOCK_DV, BLOCK_L)
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < hi
        a, _, _, _, _ = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L,
                                        PREC, L_FIRST)
        Kc += tl.dot(tl.trans(_rows(K, bh, t, in_t, N, D, BLOCK_D)), a, input_precision=PREC)
        VcT += tl.dot(tl.trans(_rows(V, bh, t, in_t, N, DV, BLOCK_DV)), a, input_precision=PREC)
    row = g.to(tl.int64) * n_bh + bh
    _put_matrix(KC, row, Kc, BLOCK_D, BLOCK_L)
    _put_matrix(VC, row, VcT, BLOCK_DV, BLOCK_L)


@triton.jit
def luna_fwd_kernel(Q, K, V, P, C, KPM, INV, KCH, VCH, KC, VC, O, N, L, H, SEG, s, BETA_: tl.constexpr,
                    HAS_KPM: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
                      L_FIRST: tl.constexpr):
    """Program (c, bh): the outputs of chunk c, from its states and its own keys."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b = bh // H
    t = c * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = t < N
    Kc = _chunk_state(KCH, KC, c, bh, SEG, BLOCK_T, BLOCK_D, BLOCK_L)
    VcT = _chunk_state(VCH, VC, c, bh, SEG, BLOCK_T, BLOCK_DV, BLOCK_L)
    a, _, _, _, _ = _packed_weights(C, P, KPM, bh, b, t, in_t, N, L, s, BETA_, HAS_KPM, D, BLOCK_D, BLOCK_L, PREC,
                                    L_FIRST)
    q = _rows(Q, bh, t, in_t, N, D, BLOCK_D)
    k = _rows(K, bh, t, in_t, N, D, BLOCK_D)
    v = _rows(V, bh, t, in_t, N, DV, BLOCK_DV)
    inv = tl.load(INV + b * N + t, mask=in_t, other=0.0)
    attn, causal = _attn(q, k, a, Kc, inv, t, L, s, BLOCK_L, PREC)
    aa = tl.where(causal, tl.dot(attn, tl.trans(a), input_precision=PREC), 0.0)
    out = (tl.dot(attn, tl.trans(VcT), input_precision=PREC) + tl.dot(aa, v, input_precision=PREC)) * inv[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(O + bh.to(tl.int64) * N * DV + t[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=in_t[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------- launcher
def luna_meta(q, v, p) -> dict:
    """Block sizes, warps and dot precision shared by the forward and backward kernels: chunks of 64 tokens on
    Hopper up to l = 64 (wgmma needs 64 rows per warpgroup), 32 above (the `[BT, l]` fp32 tiles would spill) and
    on Ampere and in the interpreter; the loops' products keep 64+ rows either way (D or l first); 8 warps from
    l = 64 or D = 128."""
    t = target(q.device)
    bl = max(16, triton.next_power_of_2(p.shape[2]))
    opts = dict(BLOCK_T=32 if t.interpreter or t.arch < 90 or bl > 64 else 64, BLOCK_L=bl,
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])),
                BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])),
                PREC="ieee" if t.interpreter or (q.dtype == torch.float32 and torch.get_float32_matmul_precision()
                                                 == "highest") else "tf32")
    opts["L_FIRST"] = not t.interpreter and t.arch >= 90 and bl >= 64 and opts["BLOCK_T"] < 64
    if not t.interpreter:
        opts.update(num_warps=8 if bl >= 64 or max(opts["BLOCK_D"], opts["BLOCK_DV"]) > 64 else 4)
    return opts


def inverse_counts(key_padding_mask, B: int, N: int, device) -> torch.Tensor:
    """`1 / n_t` float32 `[B, N]`: n_t the unpadded keys j <= t (0 where there is none)."""
    if key_padding_mask is None:
        n = torch.arange(1, N + 1, device=device, dtype=torch.float32).expand(B, N)
    else:
        n = (~key_padding_mask).to(torch.float32).cumsum(-1)
    return torch.where(n > 0, 1.0 / n.clamp(min=1.0), 0.0).contiguous()


def luna_states(k, v, p, c, kpm, seg: int, n_seg: int, opts: dict):
    """Per-chunk segment-local `sum k^T a` `[n_chunks, BH, BD, BL]`, `sum v^T a` `[n_chunks, BH, BDV, BL]`, and
    the segments' totals `[n_seg, BH, ...]`."""
    B, H, N, D = k.shape
    f32 = dict(dtype=torch.float32, device=k.device)
    bd, bdv, bl = opts["BLOCK_D"], opts["BLOCK_DV"], opts["BLOCK_L"]
    nc = triton.cdiv(N, opts["BLOCK_T"])
    kch, vch = torch.empty(nc, B * H, bd, bl, **f32), torch.empty(nc, B * H, bdv, bl, **f32)
    kc, vc = torch.empty(n_seg, B * H, bd, bl, **f32), torch.empty(n_seg, B * H, bdv, bl, **f32)
    luna_state_kernel[(B * H, n_seg)](k, v, p, c, kpm if kpm is not None else k, kch, vch, kc, vc, N, p.shape[2], H,
                                      seg, D ** -0.5, BETA_=BETA, HAS_KPM=kpm is not None, D=D, DV=v.shape[3], **opts)
    return (kch, vch), (kc, vc)


def luna_fwd(q, k, v, p, c, kpm, inv, chunks, states, seg: int, opts: dict):
    """Causal Luna forward: out `[B, H, N, D_v]` in q's dtype, one program per chunk, from the per-chunk states
    and the segments' incoming states."""
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    luna_fwd_kernel[(triton.cdiv(N, opts["BLOCK_T"]), B * H)](
        q, k, v, p, c, kpm if kpm is not None else inv, inv, *chunks, *states, out, N, p.shape[2], H, seg, D ** -0.5,
        BETA_=BETA, HAS_KPM=kpm is not None, D=D, DV=v.shape[3], **opts)
    return out
