"""Masked softmax attention on the Triton kernels, as a `torch.library` custom op with autograd.

`patterndsl::triton_softmax` (forward: out and log-sum-exp) and `patterndsl::triton_softmax_bwd` are custom
ops with fake (meta) implementations, and the backward is registered with `register_autograd`, so
`torch.compile(model, fullgraph=True)` traces through them. The mask travels as a registry key (`str`):
custom ops take tensors and plain values, not IR objects.

On a GPU (or on the CPU under TRITON_INTERPRET=1):

>>> import torch
>>> from patterndsl.ir.mask import sliding
>>> q = k = v = torch.randn(1, 2, 40, 16)
>>> softmax_attention(q, k, v, sliding(4)).shape          # doctest: +SKIP
torch.Size([1, 2, 40, 16])
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...errors import PatternError
from ...inputs import check_key_padding_mask
from ...ir import mask as M
from ..custom import flatten_ids, register, register_softmax_autograd, spec, unflatten_ids
from .codegen import mask_module
from .softmax_bwd import softmax_bwd
from .softmax_fwd import softmax_fwd
from .tiles import build_aux, make_tile_plan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def default_blocks(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head dim on a device."""
    if device.type == "cpu":   # the interpreter: fewer, larger tiles run faster
        return 32, 32, 4
    return (64, 64, 4) if head_dim <= 64 else (64, 32, 8)


def _prepare(q, k, key, ids):
    _, mask, bm, bn, split, warps, *offset = spec(key)         # interim: the offset rides in the spec
    q_offset = offset[0] if offset else 0
    runtime = unflatten_ids(mask, ids)
    plan = make_tile_plan(mask, q.shape[2], k.shape[2], bm, bn, split, runtime, q.device, q_offset)
    aux = build_aux(mask, q.shape[2], k.shape[2], q.shape[0], runtime, q.device, q_offset)
    return plan, mask_module(mask), aux, warps


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("patterndsl::triton_softmax", mutates_args=())
def _softmax_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor],
                key: str, scale: float) -> tuple[Tensor, Tensor]:
    plan, mod, aux, warps = _prepare(q, k, key, ids)
    return softmax_fwd(q.contiguous(), k.contiguous(), v.contiguous(), plan, mod, scale, key_padding_mask, aux,
                       num_warps=warps)


@_softmax_op.register_fake
def _(q, k, v, key_padding_mask, ids, key, scale):
    B, H, NQ, _ = q.shape
    return q.new_empty(B, H, NQ, v.shape[3]), q.new_empty(B, H, NQ, dtype=torch.float32)


@torch.library.custom_op("patterndsl::triton_softmax_bwd", mutates_args=())
def _softmax_bwd_op(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                    lse: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor], key: str,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    plan, mod, aux, warps = _prepare(q, k, key, ids)
    return softmax_bwd(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse,
                       plan, mod, scale, key_padding_mask, aux, dlse=dlse, num_warps=warps)


@_softmax_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, ids, key, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)   # contiguous, like the kernels'


register_softmax_autograd(_softmax_op, _softmax_bwd_op)


# ------------------------------------------------------------------------------------------------ public
def _check_inputs(q, k, v, key_padding_mask):
    """What the op checks before any backend runs (`softmax_attention` may be called directly)."""
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
            raise PatternError(f"{nm} must be a tensor [B, H, N, D], got {got}")
    if k.shape[3] != q.shape[3] or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise PatternError(f"q, k, v shapes do not fit: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2])


def _check_support(q, k, v):
    """What the kernels take beyond the op's checks."""
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise PatternError(f"the Triton kernels take float16, bfloat16, float32 or float64 q, k, v of one dtype, "
                           f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise PatternError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got q {q.shape[3]}, "
                           f"v {v.shape[3]}", hint="use backend='torch' for larger heads")


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask, scale: float | None = None,
                      key_padding_mask: Tensor | None = None, runtime: dict | None = None,
                      block: tuple[int, int] | None = None, split: int | None = None,
                      return_lse: bool = False):
    """Block-sparse softmax attention under `mask` on the Triton kernels (differentiable in q, k, v).

    q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]`; `scale` defaults to `D ** -0.5`;
    `key_padding_mask` bool `[B, N_k]` (True = ignored key); `runtime` maps `same(...)` names to ids `[B, N]`
    or `(q_ids, k_ids)`. `block` = (BLOCK_M, BLOCK_N) and `split` (most tiles per program) override the
    defaults. Returns out `[B, H, N_q, D_v]` (and lse `[B, H, N_q]` float32 if `return_lse`); float64 inputs
    are computed in float32.
    """
    _check_inputs(q, k, v, key_padding_mask)
    return run_softmax(q, k, v, mask, scale, key_padding_mask, runtime, block, split, return_lse)


def run_softmax(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask, scale: float | None = None,
                key_padding_mask: Tensor | None = None, runtime: dict | None = None,
                block: tuple[int, int] | None = None, split: int | None = None, return_lse: bool = False,
                q_offset: int = 0):
    """`softmax_attention` for inputs the op has checked (the backend's entry); query row r is at position
    `q_offset + r` (interim: the offset rides in the registered spec, as the tile plan and AUX take it)."""
    _check_support(q, k, v)
    bm, bn, warps = default_blocks(q.shape[3], q.device)
    if block is not None:
        ok = isinstance(block, (tuple, list)) and len(block) == 2 and all(
            isinstance(b, int) and b >= 16 and not b & (b - 1) for b in block)
        if not ok:
            raise PatternError(f"block must be (BLOCK_M, BLOCK_N), powers of two >= 16, got {block!r}")
        bm, bn = block
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise PatternError(f"split (most tiles per program) must be an int >= 1, got {split!r}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    ids = flatten_ids(mask, runtime, q.shape[0], q.shape[2], k.shape[2])
    key = register("triton_softmax", mask, bm, bn, split, warps, int(q_offset))
    wide = q.dtype == torch.float64             # the kernels accumulate in float32: run float64 there
    if wide:
        q, k, v = q.float(), k.float(), v.float()
    out, lse = _softmax_op(q, k, v, key_padding_mask, ids, key, scale)
    out = out.double() if wide else out
    return (out, lse) if return_lse else out
