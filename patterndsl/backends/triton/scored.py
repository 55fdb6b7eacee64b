"""Softmax with pointwise score terms on the Triton kernels of `scored_kernels.py`: the launcher and autograd.

Runs stages whose terms are a bias (with at most two learned tables, read at most twice) and/or a soft cap;
the far field runs in `near_far.py`. The tables' gradient comes from the dq pass's per-program bucket sums,
added up here in a fixed order (deterministic, no atomics). q, k, v are padded to head dims of a power of two >= 16 (zeros change no score);
grouped kv heads are indexed by the kernels. The mask's tile layout (and its transpose, for dk and dv) comes
from `plan/layout.py`; `mask_tile` and `score_tile` are generated (codegen.py, scores.py).
"""
from __future__ import annotations

import torch
import triton

from ...plan.layout import tile_layout
from .codegen import mask_module
from .scored_kernels import scored_dkv_kernel, scored_dq_kernel, scored_fwd_kernel
from .scores import MAX_SITES, MAX_TABLES, score_module, table_sites
from .tiles import build_aux

BLOCK = 16


def unsupported(score) -> str | None:
    """Why the Triton kernels cannot run these terms (None if they can)."""
    if score.far is not None:
        return None                      # near_far.py
    tables, sites = score.tables(), table_sites(score) if score.tables() else ()
    if len(tables) > MAX_TABLES or len(sites) > MAX_SITES:
        return (f"the Triton kernels read at most {MAX_TABLES} bias tables in at most {MAX_SITES} terms, got "
                f"{len(tables)} in {len(sites)}")
    return None


def _pad(x, width: int):
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous() if x.shape[-1] != width else \
        x.contiguous()


def _width(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def dkv_warps(*widths: int) -> int:
    """Warps of the dk/dv passes: a key block holds k, v, dk, dv (and the query tiles it visits) in float32, which
    spills at 4 warps from head dims of 128 (sm_90, ptxas); 8 warps share them."""
    return 8 if max(widths) > 64 else 4


class _Scored(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, t0, t1, stage, scale, key_padding_mask, runtime, q_offset, head0):
        B, H, n_q, D = q.shape
        n_k, DV = k.shape[2], v.shape[3]
        lay = tile_layout(stage.mask, n_q, n_k, BLOCK, BLOCK, runtime or None, q_offset)
        aux = build_aux(stage.mask, n_q, n_k, B, runtime, q.device, q_offset)
        gen = score_module(stage.score)
        mods = (mask_module(stage.mask).mask_tile, gen.score_tile, gen)
        qp, kp, vp = _pad(q.float(), _width(D)), _pad(k.float(), _width(D)), _pad(v.float(), _width(DV))
        kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else aux
        tabs = [aux if t is None else t.float().contiguous() for t in (t0, t1)]
        widths = [1 if t is None else t.shape[1] for t in (t0, t1)]
        out = torch.empty(B, H, n_q, vp.shape[3], device=q.device)
        lse = torch.empty(B, H, n_q, device=q.device)
        G = H // k.shape[1]
        grid = (triton.cdiv(n_q, BLOCK), B * H)
        scored_fwd_kernel[grid](qp, kp, vp, out, lse, lay.row_ptr.to(q.device), lay.col_idx.to(q.device), kpm, aux,
                                *tabs, *widths, scale, n_q, n_k, H, G, head0, q_offset, mask_tile=mods[0],
                                score_tile=mods[1], HAS_KPM=key_padding_mask is not None, D=qp.shape[3],
                                DV=vp.shape[3], BLOCK_M=BLOCK, BLOCK_N=BLOCK)
        ctx.save_for_backward(qp, kp, vp, out, lse)
        ctx.meta = (stage, scale, key_padding_mask, kpm, aux, lay, mods, G, head0, q_offset, D, DV, q.dtype)
        ctx.tables = (tabs, widths, [None if t is None else (t.shape, t.dtype) for t in (t0, t1)])
        return out[..., :DV].to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qp, kp, vp, out, lse = ctx.saved_tensors
        stage, scale, kpm_given, kpm, aux, lay, mods, G, head0, q_offset, D, DV, dtype = ctx.meta
        B, H, n_q, _ = qp.shape
        n_k = kp.shape[2]
        do = _pad(dout.float(), vp.shape[3])
        delta = (do * out).sum(-1)           # a gradient of the lse adds dlse * p to dS: delta - dlse
        delta = (delta if dlse is None else delta - dlse.float()).contiguous()
        cap = stage.score.softcap or 0.0
        tabs, widths, shapes = ctx.tables
        common = dict(mask_tile=mods[0], score_tile=mods[1], HAS_KPM=kpm_given is not None, D=qp.shape[3],
                      DV=vp.shape[3], BLOCK_M=BLOCK, BLOCK_N=BLOCK)
        dq = torch.empty_like(qp)
        sites = table_sites(stage.score) if stage.score.tables() else ()
        nb = triton.next_power_of_2(max(widths))
        part = torch.empty(triton.cdiv(n_q, BLOCK), B * H, len(sites), nb, device=qp.device) if sites else aux
        grad = getattr(mods[2], "table_grad_tile", mods[1])
        scored_dq_kernel[(triton.cdiv(n_q, BLOCK), B * H)](
            qp, kp, vp, do, lse, delta, dq, part, lay.row_ptr.to(qp.device), lay.col_idx.to(qp.device), kpm, aux,
            *tabs, *widths, scale, cap, n_q, n_k, H, G, head0, q_offset, table_grad=grad, SITES=len(sites), NB=nb,
            **common)
        tr = lay.transpose()
        dk, dv = torch.empty_like(kp), torch.empty_like(vp)
        scored_dkv_kernel[(triton.cdiv(n_k, BLOCK), B * kp.shape[1])](
            qp, kp, vp, do, lse, delta, dk, dv, tr.row_ptr.to(qp.device), tr.col_idx.to(qp.device), kpm, aux,
            *tabs, *widths, scale, cap, n_q, n_k, H, G, head0, q_offset,
            num_warps=dkv_warps(qp.shape[3], vp.shape[3]), **common)
        return (dq[..., :D].to(dtype), dk[..., :D].to(dtype), dv[..., :DV].to(dtype),
                *_table_grads(part, sites, stage.score.tables(), shapes, head0, H),
                None, None, None, None, None, None, None)


def _table_grads(part, sites, names, shapes, head0: int, H: int):
    """The gradient of each table from the dq pass's partials `[blocks, B * H, sites, NB]`: summed over blocks and
    batches, then the sites of each table added in order, into rows head0 .. head0 + H."""
    out = []
    per_head = part.sum(0).reshape(-1, H, len(sites), part.shape[-1]).sum(0) if sites else None  # [H, sites, NB]
    for slot, shape in enumerate(shapes):
        if shape is None:
            out.append(None)
            continue
        (rows, width), dtype = shape
        g = torch.zeros(rows, width, dtype=torch.float32, device=part.device)
        for s, name in enumerate(sites):
            if name == names[slot]:
                g[head0:head0 + H] += per_head[:, s, :width]
        out.append(g.to(dtype))
    return out


def scored_attention(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0, head_offset=0,
                     tables=None):
    """out `[B, H, N_q, D_v]` of a softmax stage with pointwise terms, on the Triton kernels; `tables` maps the
    bias tables the terms read to tensors `[heads, width]`."""
    ts = [(tables or {})[n] for n in stage.score.tables()] + [None] * (MAX_TABLES - len(stage.score.tables()))
    return _Scored.apply(q, k, v, *ts, stage, float(scale), key_padding_mask, runtime or {}, int(q_offset),
                         int(head_offset))[0]


def scored_with_lse(stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0, head_offset=0):
    """(out, lse `[B, H, N_q]` float32, -inf on rows with no key) of a stage without tables; both differentiable
    (near + far combines them with its far sums)."""
    return _Scored.apply(q, k, v, None, None, stage, float(scale), key_padding_mask, runtime or {}, int(q_offset),
                         int(head_offset))
