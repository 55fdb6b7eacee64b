"""Causal Luna (nested attention through l packed queries), forward: one program per (batch, head) scans the
sequence in chunks of BLOCK_T tokens (the semantics are patterndsl/backends/reference/nested.py's).

With `s = d^-1/2`, `a_j = softplus_beta(s c_j . p)` (zero on padded keys, `beta = ln 2`) and `inv_t = 1/n_t`:

    logits_t = inv_t * s q_t . Kc_t,  Kc_t = sum_{j <= t} k_j a_j^T   [D, l]
    out_t    = inv_t * softmax(logits_t) . Vc_t,  Vc_t = sum_{j <= t} a_j^T v_j   [l, D_v]

The states Kc and Vc carry the chunks before; inside a chunk the `j <= t` terms are masked matrix products.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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
def luna_fwd_kernel(Q, K, V, P, C, KPM, INV, O, N, L, H, s, BETA_: tl.constexpr, HAS_KPM: tl.constexpr,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    Kc = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    Vc = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t0 in range(0, N, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_t = t < N
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
    """Block sizes and dot precision shared by the forward and backward kernels."""
    return dict(BLOCK_T=32 if q.device.type == "cpu" else 64, BLOCK_L=max(16, triton.next_power_of_2(p.shape[2])),
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])),
                BLOCK_DV=max(16, triton.next_power_of_2(v.shape[3])),
                PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32")


def inverse_counts(key_padding_mask, B: int, N: int, device) -> torch.Tensor:
    """`1 / n_t` float32 `[B, N]`: n_t the unpadded keys j <= t (0 where there is none)."""
    if key_padding_mask is None:
        n = torch.arange(1, N + 1, device=device, dtype=torch.float32).expand(B, N)
    else:
        n = (~key_padding_mask).to(torch.float32).cumsum(-1)
    return torch.where(n > 0, 1.0 / n.clamp(min=1.0), 0.0).contiguous()


def luna_fwd(q, k, v, p, c, key_padding_mask, inv):
    """Causal Luna forward: out `[B, H, N, D_v]` in q's dtype. All tensors contiguous, p `[B, H, l, D]`."""
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, v.shape[3], dtype=q.dtype, device=q.device)
    if B * H and N:
        kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else inv
        luna_fwd_kernel[(B * H,)](q, k, v, p, c, kpm, inv, out, N, p.shape[2], H, D ** -0.5, BETA_=BETA,
                                  HAS_KPM=key_padding_mask is not None, D=D, DV=v.shape[3], **luna_meta(q, v, p))
    return out
