"""Luna on the Triton kernels. Pack and unpack are softmax stages over `full` (the op runs them through
softmax.py's block-sparse kernels like any other stage); causal Luna (`nested(p)`) is the scan kernel pair in
luna_fwd.py / luna_bwd.py, wrapped here as a custom op with autograd (gradients for q, k, v, p and c).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...errors import PatternError
from ..custom import register_backward
from .luna_bwd import luna_bwd
from .luna_fwd import inverse_counts, luna_fwd


@torch.library.custom_op("patterndsl::triton_luna", mutates_args=())
def _luna_op(q: Tensor, k: Tensor, v: Tensor, p: Tensor, c: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    inv = inverse_counts(key_padding_mask, q.shape[0], q.shape[2], q.device)
    return luna_fwd(q.contiguous(), k.contiguous(), v.contiguous(), p.contiguous(), c.contiguous(),
                    key_padding_mask, inv)


@_luna_op.register_fake
def _(q, k, v, p, c, key_padding_mask):
    return q.new_empty(*q.shape[:3], v.shape[3])


@torch.library.custom_op("patterndsl::triton_luna_bwd", mutates_args=())
def _luna_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, c: Tensor,
                 key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inv = inverse_counts(key_padding_mask, q.shape[0], q.shape[2], q.device)
    return luna_bwd(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), p.contiguous(),
                    c.contiguous(), key_padding_mask, inv)


@_luna_bwd_op.register_fake
def _(dout, q, k, v, p, c, key_padding_mask):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, p, c))   # contiguous, like the kernels'


register_backward(_luna_op, _luna_bwd_op, lambda d, x, o: (d[0], *x), save_outputs=False)


def nested_attention(q: Tensor, k: Tensor, v: Tensor, p: Tensor, c: Tensor,
                     key_padding_mask: Tensor | None = None) -> Tensor:
    """Causal Luna: q, k, c `[B, H, N, D]`, v `[B, H, N, D_v]`, p `[B, H, l, D]` (packed queries pq(P)),
    `key_padding_mask` bool `[B, N]`. Returns `[B, H, N, D_v]` (differentiable in q, k, v, p, c)."""
    dtypes = {t.dtype for t in (q, k, v, p, c)}
    if len(dtypes) != 1 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise PatternError(f"causal Luna takes float q, k, v, p, c of one dtype, got {sorted(map(str, dtypes))}")
    B, H, N, D = q.shape
    if k.shape != q.shape or c.shape != q.shape or v.shape[:3] != q.shape[:3] or p.dim() != 4 \
            or tuple(p.shape[:2]) != (B, H) or p.shape[3] != D:
        raise PatternError(f"causal Luna needs q, k, c [B, H, N, D], v [B, H, N, D_v], p [B, H, l, D]: got "
                           f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, p {list(p.shape)}, "
                           f"c {list(c.shape)}")
    if p.shape[2] > 128:
        raise PatternError(f"the Triton causal Luna kernel takes up to 128 packed queries, got {p.shape[2]}",
                           hint="use backend='torch' or 'reference' for longer packs")
    return _luna_op(q, k, v, p, c, key_padding_mask)
