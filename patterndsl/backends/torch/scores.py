"""Softmax with score terms in torch ops, on gathered tiles: the torch backend's `scored` stages.

Per query tile of `BLOCK_M` rows, the keys of its nonempty tiles (the mask's closed-form layout,
`plan/layout.py`) are gathered once; the scores are computed on them, the stage's terms applied by their one
definition (`Score.apply` with `TorchScoreOps`: bias, soft cap), then the element mask and the softmax.
Autograd gives the gradients of q, k, v and of every bias table; a table's gradient is summed per bucket by a
one-hot product (`BucketGather`), never by atomics, so it is the same on every run. Memory is O(N x row
length), as the block-sparse path. Grouped kv heads are indexed, not repeated: the heads of a group score one
gathered kv tile.

An additive bias whose gradient is not needed (no soft cap, no table that requires grad) rides in the fused CPU
flash kernel's float mask instead (`flash.py`: the bias, -inf where the mask or padding forbids), on the same
gathered tiles: the kernel's backward gives dq, dk, dv but no dS, which a soft cap or a learned table's
gradient would need.
"""
from __future__ import annotations

import functools

import torch

from ...ir.dense import dense_tile
from ...ir.scores.ops import TorchScoreOps
from ...plan.layout import tile_layout
from . import flash
from .softmax import BLOCK   # the block-sparse tiles (plans and explain show them)
_LOW = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=32)
def _layout(mask, n_q, n_k, bm, bn, q_offset):
    return tile_layout(mask, n_q, n_k, bm, bn, None, q_offset)


def tiles(mask, n_q, n_k, runtime, q_offset, block=BLOCK):
    """For each query tile: (rows, gathered key columns) of its nonempty key tiles."""
    bm, bn = block
    lay = tile_layout(mask, n_q, n_k, bm, bn, runtime, q_offset) if runtime else _layout(mask, n_q, n_k, bm, bn,
                                                                                         q_offset)
    out = []
    for a in range(lay.row_ptr.numel() - 1):
        rows = torch.arange(a * bm, min(n_q, (a + 1) * bm))
        t = lay.col_idx[lay.row_ptr[a]:lay.row_ptr[a + 1]]
        cols = (t[:, None] * bn + torch.arange(bn)).reshape(-1)
        out.append((rows, cols[cols < n_k]))
    return out


def allowed_on(mask, rows, cols, shape, runtime, q_offset, key_padding_mask):
    """The element mask on a gathered tile: `[B or 1, 1, rows, cols]`, padded keys removed."""
    ok = dense_tile(mask, rows, cols, shape, runtime, q_offset)
    ok = (ok if ok.dim() == 3 else ok[None])[:, None]
    if key_padding_mask is not None:
        ok = ok & ~key_padding_mask[:, cols][:, None, None, :]
    return ok


def grouped(x, groups: int):
    """`[B, H, n, ...]` as `[B, H_kv, G * n, ...]` (the heads of a kv group stacked)."""
    B, H = x.shape[:2]
    return x.reshape(B, H // groups, groups * x.shape[2], *x.shape[3:])


def ungrouped(x, heads: int):
    B, H_kv, gn = x.shape[:3]
    return x.reshape(B, heads, gn * H_kv // heads, *x.shape[3:])


class _BiasFlash(torch.autograd.Function):
    """The fused CPU flash kernel on one gathered tile with an additive float mask (bias and -inf): q, k, v get
    gradients, the mask does not."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = flash.flash_fwd(q, k, v, scale, mask)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = flash.flash_bwd(dout.contiguous(), q, k, v, out, lse, ctx.scale, mask)
        return dq, dk, dv, None, None


def fused_bias(stage, q, k, v, tables: dict) -> bool:
    """Whether the stage's terms can ride in the flash kernel's mask: a bias only, no table needing a gradient."""
    sc = stage.score
    return (sc.softcap is None and sc.far is None and sc.bias is not None and flash.runs(q, k, v)
            and not any(t.requires_grad for t in tables.values()))


def scored_attention(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0, head_offset=0,
                     tables=None, block=BLOCK):
    """out `[B, H, N_q, D_v]` of a softmax stage with pointwise score terms, in q's dtype."""
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = (x.to(work) for x in (q, k, v))
    tables = {n: t.to(work) for n, t in (tables or {}).items()}
    B, H, n_q, _ = q.shape
    G = H // k.shape[1]
    heads = torch.arange(H, device=q.device)[:, None, None] + head_offset
    fused = fused_bias(stage, q, k, v, tables)
    parts = []
    for rows, cols in tiles(stage.mask, n_q, k.shape[2], runtime, q_offset, block):
        rows, cols = rows.to(q.device), cols.to(q.device)
        if cols.numel() == 0:
            parts.append(q.new_zeros(B, H, rows.numel(), v.shape[3]))
            continue
        kc, vc = k[:, :, cols], v[:, :, cols]
        if fused:
            ops = TorchScoreOps(rows[:, None] + q_offset, cols[None, :], heads, tables, work)
            ok = allowed_on(stage.mask, rows, cols, (n_q, k.shape[2]), runtime, q_offset, key_padding_mask)
            bias = torch.as_tensor(stage.score.bias.at(ops), dtype=work, device=q.device).expand(H, *ok.shape[-2:])
            mask = bias.masked_fill(~ok, float("-inf"))                                  # [B or 1, H, n, K]
            parts.append(_BiasFlash.apply(q[:, :, rows], kc, vc, mask, float(scale)))
            continue
        s = ungrouped(grouped(q[:, :, rows], G) @ kc.transpose(-1, -2), H) * scale       # [B, H, n, K]
        ops = TorchScoreOps(rows[:, None] + q_offset, cols[None, :], heads, tables, work, deterministic=True)
        s = stage.score.apply(s, ops)
        ok = allowed_on(stage.mask, rows, cols, (n_q, k.shape[2]), runtime, q_offset, key_padding_mask)
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
        parts.append(ungrouped(grouped(p, G) @ vc, H))
    out = torch.cat(parts, 2) if parts else q.new_zeros(B, H, 0, v.shape[3])
    return out.to(dtype)
