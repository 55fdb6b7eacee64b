"""Near + far in one softmax (docs/language.md §5.6) on the Triton backend. What runs where:

- Triton, the quadratic part (the near field's tiles, never N x N):
  the exact near softmax as `(o_near, lse_near)` on the scored kernels (`scored.py`, no terms; the backward takes
  the gradient of the lse too), and the near keys' feature products `A_i = sum_near (phi_q_i . phi_k_j) v_j`,
  `a_i = sum_near phi_q_i . phi_k_j` (`near_far_kernels.py`, own backward);
- torch, O(N m d): the features `phi` with their stabilisers (those of the torch backend, `backends/torch/
  near_far.py`), the far totals `phi_q_i . sum_j phi_k_j v_j^T` over all keys or, causal, over the keys `j <= i`
  (per chunk of `CHUNK` keys: a prefix sum of chunk states plus the chunk's own triangle), and the combination

      out_i = (e^{lse_i - M_i} o_near_i + e^{f_i - M_i} (F_i - A_i)) / (e^{lse_i - M_i} + e^{f_i - M_i} (z_i - a_i))

  with `f_i = c_i + c` the log scale of the feature products and `M_i = max(lse_i, f_i)`; a row with no weight
  outputs 0. Autograd composes the two kernels' backwards with torch's.
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from ...ir.scores import Score
from ...plan.layout import tile_layout
from ..torch.near_far import features, key_features
from .codegen import mask_module
from .near_far_kernels import near_feat_dkv_kernel, near_feat_dq_kernel, near_feat_fwd_kernel
from .scored import BLOCK, _pad, _width, dkv_warps, scored_with_lse
from .tiles import build_aux

CHUNK = 64


class _NearFeatures(torch.autograd.Function):
    """(A `[B, H, N_q, D_v]`, a `[B, H, N_q]`) of the near field's feature products, float32."""

    @staticmethod
    def forward(ctx, pq, pk, v, mask, key_padding_mask, runtime, q_offset):
        B, H, n_q, _ = pq.shape
        n_k, DV = pk.shape[2], v.shape[3]
        lay = tile_layout(mask, n_q, n_k, BLOCK, BLOCK, runtime or None, q_offset)
        aux = build_aux(mask, n_q, n_k, B, runtime, pq.device, q_offset)
        width = _width(pq.shape[3])
        pqp, pkp, vp = _pad(pq.float(), width), _pad(pk.float(), width), _pad(v.float(), _width(DV))
        kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else aux
        a = torch.empty(B, H, n_q, vp.shape[3], device=pq.device)
        asum = torch.empty(B, H, n_q, device=pq.device)
        G = H // pk.shape[1]
        common = dict(mask_tile=mask_module(mask).mask_tile, HAS_KPM=key_padding_mask is not None, M=width,
                      DV=vp.shape[3], BLOCK_M=BLOCK, BLOCK_N=BLOCK)
        near_feat_fwd_kernel[(triton.cdiv(n_q, BLOCK), B * H)](
            pqp, pkp, vp, a, asum, lay.row_ptr.to(pq.device), lay.col_idx.to(pq.device), kpm, aux, n_q, n_k, H, G,
            **common)
        ctx.save_for_backward(pqp, pkp, vp)
        ctx.meta = (lay, kpm, aux, G, common, pq.shape[3], DV, pq.dtype, v.dtype)
        return a[..., :DV], asum

    @staticmethod
    def backward(ctx, da, dasum):
        pqp, pkp, vp = ctx.saved_tensors
        lay, kpm, aux, G, common, m, DV, pdtype, vdtype = ctx.meta
        B, H, n_q, _ = pqp.shape
        n_k = pkp.shape[2]
        da = _pad(da.float(), vp.shape[3])
        dasum = dasum.float().contiguous()
        dpq = torch.empty_like(pqp)
        near_feat_dq_kernel[(triton.cdiv(n_q, BLOCK), B * H)](
            pqp, pkp, vp, da, dasum, dpq, lay.row_ptr.to(pqp.device), lay.col_idx.to(pqp.device), kpm, aux, n_q,
            n_k, H, G, **common)
        tr = lay.transpose()
        dpk, dv = torch.empty_like(pkp), torch.empty_like(vp)
        near_feat_dkv_kernel[(triton.cdiv(n_k, BLOCK), B * pkp.shape[1])](
            pqp, pkp, vp, da, dasum, dpk, dv, tr.row_ptr.to(pqp.device), tr.col_idx.to(pqp.device), kpm, aux, n_q,
            n_k, H, G, num_warps=dkv_warps(pkp.shape[3], vp.shape[3]), **common)
        return dpq[..., :m].to(pdtype), dpk[..., :m].to(pdtype), dv[..., :DV].to(vdtype), None, None, None, None


def far_sums(pq, pk, v, causal: bool, q_offset: int):
    """(F `[B, H, N_q, D_v]`, z `[B, H, N_q]`): `phi_q_i . sum_j phi_k_j v_j^T` and `phi_q_i . sum_j phi_k_j` over
    all keys or, causal, the keys `j <= i` (absolute `i`), in O(N m d) (k, v already repeated to q's heads)."""
    if not causal:
        return pq @ (pk.transpose(-1, -2) @ v), pq @ pk.sum(2)[..., None]
    B, H, n_q, m = pq.shape
    n_k, C = pk.shape[2], CHUNK
    front = q_offset % C                                    # queries front-padded to chunks of absolute positions
    first = q_offset // C                                   # the key chunk of the first query chunk
    nqc = triton.cdiv(front + n_q, C)
    nkc = max(triton.cdiv(n_k, C), first + nqc)
    pk_c = torch.nn.functional.pad(pk, (0, 0, 0, nkc * C - n_k)).reshape(B, H, nkc, C, m)
    v_c = torch.nn.functional.pad(v, (0, 0, 0, nkc * C - n_k)).reshape(B, H, nkc, C, v.shape[3])
    kv = torch.cat([torch.zeros_like(pk_c[:, :, :1, 0, :, None] * v_c[:, :, :1, 0, None, :]),
                    (pk_c.transpose(-1, -2) @ v_c).cumsum(2)], 2)           # exclusive prefix [B, H, nkc + 1, m, D_v]
    z = torch.cat([torch.zeros_like(pk_c[:, :, :1, 0]), pk_c.sum(3).cumsum(2)], 2)      # [B, H, nkc + 1, m]
    q_c = torch.nn.functional.pad(pq, (0, 0, front, nqc * C - front - n_q)).reshape(B, H, nqc, C, m)
    own = slice(first, first + nqc)
    tri = torch.ones(C, C, dtype=torch.bool, device=pq.device).tril()
    a = (q_c @ pk_c[:, :, own].transpose(-1, -2)) * tri                   # [B, H, nqc, C, C]
    num = q_c @ kv[:, :, own] + a @ v_c[:, :, own]
    den = (q_c * z[:, :, own, None, :]).sum(-1) + a.sum(-1)
    num = num.reshape(B, H, nqc * C, -1)[:, :, front:front + n_q]
    den = den.reshape(B, H, nqc * C, 1)[:, :, front:front + n_q]
    return num, den


def near_far_attention(stage, q, k, v, w, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
    """out `[B, H, N_q, D_v]` of a softmax stage with a far field; `w` the projection `[m, D]`."""
    dtype = q.dtype
    q32, k32, v32, w32 = (x.float() for x in (q, k, v, w))
    B, H, n_q, _ = q.shape
    G = H // k.shape[1]
    near = dataclasses.replace(stage, score=Score())
    o_near, lse = scored_with_lse(near, q32, k32, v32, scale=scale, key_padding_mask=key_padding_mask,
                                  runtime=runtime, q_offset=q_offset)
    a_q, c_q = features(q32, w32, scale)
    pq = torch.exp(a_q - c_q) / w.shape[0] ** 0.5                        # [B, H, N_q, m]
    pk, c_k = key_features(k32, w32, scale, key_padding_mask)            # [B, H_kv, N_k, m]
    near_a, near_z = _NearFeatures.apply(pq, pk, v32, stage.mask, key_padding_mask, runtime or {}, int(q_offset))
    rep = (lambda x: x.repeat_interleave(G, 1)) if G > 1 else (lambda x: x)   # noqa: E731
    num, den = far_sums(pq, rep(pk), rep(v32), stage.score.far.causal, int(q_offset))
    f = c_q + rep(c_k)                                                   # [B, H, N_q, 1]
    lse = lse[..., None]
    top = torch.maximum(torch.where(torch.isfinite(lse), lse, f), f).detach()
    w_near = torch.exp(lse - top)
    w_far = torch.exp(f - top)
    total = w_near + w_far * (den - near_z[..., None])
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (w_near * o_near + w_far * (num - near_a)) / safe
    return torch.where(total > 0, out, torch.zeros_like(out)).to(dtype)
