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
from ..custom import flatten_ids, register, register_backward, spec, unflatten_ids
from .codegen import mask_module
from .offsets import QueryOffsets, absolute_runtime, offset_plan, offset_values
from .softmax_bwd import softmax_bwd
from .softmax_fwd import softmax_fwd
from .target import target
from .tiles import build_aux

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def default_blocks(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head dim on a device: 64 x 64 tiles with one warpgroup up to D = 128
    (wgmma on every dot on Hopper, no spills; see aot.py), 64 x 32 above."""
    if target(device).interpreter:   # fewer, larger tiles run faster
        return 32, 32, 4
    return (64, 64, 4) if head_dim <= 128 else (64, 32, 4)


def kernel_options(dtype: torch.dtype, device, num_warps: int, head_dim: int = 64) -> dict[str, dict]:
    """Launch options of the forward (and dq) and the dk/dv kernels. fp32 inputs take TF32 tensor cores when torch
    allows TF32 matmuls (`torch.set_float32_matmul_precision("high")`), else exact fp32 products; the interpreter
    upcasts bf16. dk/dv holds two accumulators: 8 warps above D = 64, and no software pipelining on Ampere at
    D = 64 (both keep it free of register spills; see aot.py)."""
    t = target(device)
    prec = None
    if dtype == torch.float32:
        prec = "tf32" if not t.interpreter and torch.get_float32_matmul_precision() != "highest" else "ieee"
    fwd = {"PREC": prec, "UPCAST": t.interpreter and dtype == torch.bfloat16, "num_warps": num_warps}
    dkdv = dict(fwd)
    if not t.interpreter and head_dim > 64:
        dkdv["num_warps"] = max(num_warps, 8)
    elif not t.interpreter and t.arch < 90:
        dkdv["num_stages"] = 1
    return {"fwd": fwd, "dkdv": dkdv}


def _unit(x: Tensor) -> Tensor:
    """`x` with unit stride in its last dim (the kernels take the other strides as arguments)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _prepare(q, k, key, ids, q_offset):
    _, mask, bm, bn, split, warps = spec(key)
    B, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    offsets = QueryOffsets(tuple(q_offset), str(q.device))
    given = unflatten_ids(mask, ids)
    plan = offset_plan(mask, n_q, n_k, bm, bn, split, offsets, given, q.device)
    # one offset mechanism: AUX[0] holds the smallest offset and mask_tile adds it to the row it gets; batch rows
    # further on (per-row offsets that differ) pass their row plus their offset past AUX[0] (`rel`)
    rel = offsets.relative()
    aux = build_aux(mask, rel.extent(n_q), n_k, B, absolute_runtime(mask, given, rel, n_q), q.device, offsets.base)
    return plan, mask_module(mask), aux, rel, kernel_options(q.dtype, q.device, warps, q.shape[3])


# ------------------------------------------------------------------------------------------- custom ops
def forward_body(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], ids: list[Tensor], key: str,
                 scale: float, q_offset: list[int]) -> tuple[Tensor, Tensor]:
    """The forward custom op's body: (out, lse)."""
    plan, mod, aux, offsets, opts = _prepare(q, k, key, ids, q_offset)
    return softmax_fwd(_unit(q), _unit(k), _unit(v), plan, mod, scale, key_padding_mask, aux, offsets, opts["fwd"])


def backward_body(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  key_padding_mask: Optional[Tensor], ids: list[Tensor], key: str, scale: float,
                  q_offset: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The backward custom op's body: (dq, dk, dv), contiguous."""
    plan, mod, aux, offsets, opts = _prepare(q, k, key, ids, q_offset)
    return softmax_bwd(dout.contiguous(), _unit(q), _unit(k), _unit(v), out.contiguous(), lse, plan, mod, scale,
                       key_padding_mask, aux, offsets, opts, dlse=dlse)


_softmax_op = torch.library.custom_op("patterndsl::triton_softmax", forward_body, mutates_args=())
_softmax_bwd_op = torch.library.custom_op("patterndsl::triton_softmax_bwd", backward_body, mutates_args=())


@_softmax_op.register_fake
def _(q, k, v, key_padding_mask, ids, key, scale, q_offset):
    B, H, NQ, _ = q.shape
    return q.new_empty(B, H, NQ, v.shape[3]), q.new_empty(B, H, NQ, dtype=torch.float32)


@_softmax_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, key_padding_mask, ids, key, scale, q_offset):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)   # contiguous, like the kernels'


register_backward(_softmax_op, _softmax_bwd_op, lambda d, x, o: (d[0], d[1], *x[:3], *o, *x[3:]))


# ------------------------------------------------------------------------------------------------ public
def check_dtypes(what: str, *tensors) -> None:
    """One float16, bfloat16 or float32 dtype; float64 is refused (the kernels accumulate in float32)."""
    dtypes = [t.dtype for t in tensors]
    if dtypes[0] == torch.float64 and len(set(dtypes)) == 1:
        raise PatternError(f"{what} on the Triton kernels computes in float32 at most, so float64 inputs would "
                           f"come back at float32 accuracy", hint="use backend='torch' or backend='reference' for "
                                                                  "float64, or pass float32 tensors")
    if dtypes[0] not in _DTYPES or len(set(dtypes)) != 1:
        raise PatternError(f"the Triton kernels take float16, bfloat16 or float32 tensors of one dtype, got "
                           f"{', '.join(str(d) for d in dtypes)}")


def _check_inputs(q, k, v, key_padding_mask):
    """What the op checks before any backend runs (`softmax_attention` may be called directly); k, v may have
    fewer heads than q (GQA)."""
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
            raise PatternError(f"{nm} must be a tensor [B, H, N, D], got {got}")
    B, H = q.shape[:2]
    if (k.shape[3] != q.shape[3] or k.shape[0] != B or k.shape[1] < 1 or H % k.shape[1]
            or v.shape[:3] != k.shape[:3]):
        raise PatternError(f"q, k, v shapes do not fit: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}",
                           hint="q [B, H, N_q, D], k [B, H_kv, N_k, D], v [B, H_kv, N_k, D_v], H_kv dividing H")
    check_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2])


def _check_support(q, k, v):
    """What the kernels take beyond the op's checks."""
    check_dtypes("softmax attention", q, k, v)
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise PatternError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got q {q.shape[3]}, "
                           f"v {v.shape[3]}", hint="use backend='torch' for larger heads")


def _blocks(q, block, split):
    bm, bn, warps = default_blocks(q.shape[3], q.device)
    if block is not None:
        ok = isinstance(block, (tuple, list)) and len(block) == 2 and all(
            isinstance(b, int) and b >= 16 and not b & (b - 1) for b in block)
        if not ok:
            raise PatternError(f"block must be (BLOCK_M, BLOCK_N), powers of two >= 16, got {block!r}")
        bm, bn = block
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or split < 1):
        raise PatternError(f"split (most tiles per program) must be an int >= 1, got {split!r}")
    return bm, bn, warps


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask, scale: float | None = None,
                      key_padding_mask: Tensor | None = None, runtime: dict | None = None,
                      block: tuple[int, int] | None = None, split: int | None = None,
                      return_lse: bool = False, q_offset=None):
    """Block-sparse softmax attention under `mask` on the Triton kernels (differentiable in q, k, v).

    q `[B, H, N_q, D]`, k `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` with H_kv dividing H (GQA: head h reads
    kv head `h // (H // H_kv)`; dk, dv sum over the heads sharing one); float16, bfloat16 or float32
    (float64 is refused). `scale` defaults to `D ** -0.5`; `key_padding_mask` bool `[B, N_k]` (True = ignored
    key); `runtime` maps `same(...)` names to ids `[B, N]` or `(q_ids [B, N_q], k_ids [B, N_k])`; `q_offset`
    (int, or integer tensor `[B]`; default 0) puts query row r at absolute position `q_offset + r` for the mask
    (a tensor is read on the host). `block` = (BLOCK_M, BLOCK_N) and `split` (most tiles per program) override
    the defaults. Returns out `[B, H, N_q, D_v]` (and lse `[B, H, N_q]` float32 if `return_lse`).
    """
    _check_inputs(q, k, v, key_padding_mask)
    return run_softmax(q, k, v, mask, scale, key_padding_mask, runtime, block, split, return_lse, q_offset)


def run_softmax(q: Tensor, k: Tensor, v: Tensor, mask: M.Mask, scale: float | None = None,
                key_padding_mask: Tensor | None = None, runtime: dict | None = None,
                block: tuple[int, int] | None = None, split: int | None = None, return_lse: bool = False,
                q_offset=None):
    """`softmax_attention` for inputs the op has checked (the backend's entry)."""
    _check_support(q, k, v)
    bm, bn, warps = _blocks(q, block, split)
    offsets = list(offset_values(q_offset, q.shape[0])) or [0]   # never empty: autograd reads [] as a list
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    ids = flatten_ids(mask, runtime, q.shape[0], q.shape[2], k.shape[2])
    key = register("triton_softmax", mask, bm, bn, split, warps)
    out, lse = _softmax_op(q, k, v, key_padding_mask, ids, key, scale, offsets)
    return (out, lse) if return_lse else out
