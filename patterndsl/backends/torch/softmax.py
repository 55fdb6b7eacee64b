"""Block-sparse softmax attention in torch ops, as a `torch.library` custom op with autograd.

`patterndsl::torch_softmax` (out and log-sum-exp) and `patterndsl::torch_softmax_bwd` run the chunked
kernels of `blocksparse.py` over the `Schedule` of the mask; they have fake (meta) implementations and the
backward is registered with `register_autograd`, so `torch.compile(model, fullgraph=True)` traces through
them without looking inside (the schedule is built from Python ints and cached, not traced).

>>> import torch
>>> from patterndsl.ir.mask import sliding, cols
>>> q = k = v = torch.randn(1, 2, 100, 16)
>>> softmax_attention(q, k, v, sliding(8) | cols({0})).shape
torch.Size([1, 2, 100, 16])
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ...errors import PatternError
from ...ir import mask as M
from ..custom import flatten_ids, register, register_softmax_autograd, spec, unflatten_ids
from .blocksparse import blocksparse_bwd, blocksparse_fwd
from .schedule import Schedule, make_schedule

BLOCK = (128, 32)  # Longformer, 2 CPU cores: the fastest of (64|128) x (32|64) at N = 4k..64k, fwd and fwd+bwd
_LOW = (torch.float16, torch.bfloat16)


def _schedule(q, k, key, ids, q_offset) -> Schedule:
    _, mask, bm, bn, split = spec(key)
    runtime = unflatten_ids(mask, ids)
    heads = q.shape[0] * q.shape[1]
    if runtime:
        return make_schedule(mask, q.shape[2], k.shape[2], bm, bn, heads, split, runtime,
                             q_offset=q_offset).to(q.device)
    return _on_device(mask, q.shape[2], k.shape[2], bm, bn, heads, split, q.device, q_offset)


@functools.lru_cache(maxsize=32)
def _on_device(mask, n_q, n_k, bm, bn, heads, split, device, q_offset) -> Schedule:
    sched = make_schedule(mask, n_q, n_k, bm, bn, heads, split, q_offset=q_offset)
    return sched if device.type == "cpu" else sched.to(device)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _work(*xs):
    """fp16/bf16 tensors in float32 (the kernels' softmax runs in the working precision)."""
    return [x.float() if x is not None and x.dtype in _LOW else x for x in xs]


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("patterndsl::torch_softmax", mutates_args=())
def _softmax_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor],
                key: str, scale: float, q_offset: int) -> tuple[Tensor, Tensor]:
    sched = _schedule(q, k, key, ids, q_offset)
    out, lse = blocksparse_fwd(*_work(q, k, v), sched, scale, key_padding_mask)
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


@_softmax_op.register_fake
def _(q, k, v, key_padding_mask, ids, key, scale, q_offset):
    B, H, NQ, _ = q.shape
    return q.new_empty(B, H, NQ, v.shape[3]), q.new_empty(B, H, NQ, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("patterndsl::torch_softmax_bwd", mutates_args=())
def _softmax_bwd_op(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                    lse: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor], key: str,
                    scale: float, q_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    sched = _schedule(q, k, key, ids, q_offset)
    work = _work(dout, q, k, v, out)
    wide = work[1].dtype
    dq, dk, dv = blocksparse_bwd(*work, lse.to(wide), sched, scale, key_padding_mask,
                                 dlse=None if dlse is None else dlse.to(wide))
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@_softmax_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, ids, key, scale, q_offset):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_softmax_autograd(_softmax_op, _softmax_bwd_op)


# ------------------------------------------------------------------------------------------------ public
def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask, scale: float | None = None,
                      key_padding_mask: Tensor | None = None, runtime: dict | None = None,
                      block: tuple[int, int] = BLOCK, split: int | None = None, return_lse: bool = False,
                      q_offset: int = 0):
    """Block-sparse softmax attention under `mask` in torch ops (differentiable in q, k, v; any device).

    q `[B, H, N_q, D]`, k `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv dividing H: head h reads kv head
    `h // (H / H_kv)`, K/V never repeated); query row r is at position `q_offset + r`; `scale` defaults to
    `D ** -0.5`;
    `key_padding_mask` bool `[B, N_k]` (True = ignored key); `runtime` maps `same(...)` names to ids `[B, N]`
    or `(q_ids, k_ids)`. `block` = (BLOCK_M, BLOCK_N) tiles; `split` caps the key tiles of one work item
    (None: twice the mean nonempty row). Returns out `[B, H, N_q, D_v]` (and, if `return_lse`, lse
    `[B, H, N_q]`: float64 for float64 inputs, else float32); fp16/bf16 are computed in float32. Memory is
    O(N * row length), never N x N.
    """
    if not (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise PatternError(f"block must be (BLOCK_M, BLOCK_N), two ints >= 1, got {block!r}")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise PatternError(f"split (most key tiles per work item) must be an int >= 1, got {split!r}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    ids = flatten_ids(mask, runtime, q.shape[0], q.shape[2], k.shape[2])
    key = register("torch_softmax", mask, int(block[0]), int(block[1]), split)
    out, lse = _softmax_op(q, k, v, key_padding_mask, ids, key, scale, int(q_offset))
    return (out, lse) if return_lse else out
