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
from .luna_fwd import inverse_counts, luna_fwd, luna_meta, luna_states
from .scan import prefix, segments, suffix
from .softmax import check_dtypes
from .target import target

MAX_PACKED = 128


def _setup(q, k, v, p, c, key_padding_mask):
    """(contiguous inputs, uint8 padding or None, inverse counts, options, segment length, segments)."""
    q, k, v, p, c = (x.contiguous() for x in (q, k, v, p, c))
    B, H, N, _ = q.shape
    inv = inverse_counts(key_padding_mask, B, N, q.device)
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None
    opts = luna_meta(q, v, p)
    seg, n_seg = segments(N, opts["BLOCK_T"], B * H, target(q.device).sms)
    return (q, k, v, p, c), kpm, inv, opts, seg, n_seg


def _states(xs, kpm, seg, n_seg, opts):
    """(per-chunk segment-local sums, the sums entering each segment)."""
    q, k, v, p, c = xs
    chunks, (kc, vc) = luna_states(k, v, p, c, kpm, seg, n_seg, opts)
    return chunks, (prefix(kc), prefix(vc))


def forward_body(q: Tensor, k: Tensor, v: Tensor, p: Tensor, c: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """The forward custom op's body."""
    xs, kpm, inv, opts, seg, n_seg = _setup(q, k, v, p, c, key_padding_mask)
    if not xs[0].numel():
        return xs[0].new_empty(*xs[0].shape[:3], v.shape[3])
    return luna_fwd(*xs, kpm, inv, *_states(xs, kpm, seg, n_seg, opts), seg, opts)


def backward_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor, c: Tensor,
                  key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward custom op's body: (dq, dk, dv, dp, dc), contiguous."""
    xs, kpm, inv, opts, seg, n_seg = _setup(q, k, v, p, c, key_padding_mask)
    if not xs[0].numel():
        return tuple(torch.zeros_like(x) for x in xs)
    return luna_bwd(dout.contiguous(), *xs, kpm, inv, *_states(xs, kpm, seg, n_seg, opts), suffix, seg, n_seg, opts)


_luna_op = torch.library.custom_op("patterndsl::triton_luna", forward_body, mutates_args=())
_luna_bwd_op = torch.library.custom_op("patterndsl::triton_luna_bwd", backward_body, mutates_args=())


@_luna_op.register_fake
def _(q, k, v, p, c, key_padding_mask):
    return q.new_empty(*q.shape[:3], v.shape[3])


@_luna_bwd_op.register_fake
def _(dout, q, k, v, p, c, key_padding_mask):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, p, c))   # contiguous, like the kernels'


register_backward(_luna_op, _luna_bwd_op, lambda d, x, o: (d[0], *x), save_outputs=False)


def nested_attention(q: Tensor, k: Tensor, v: Tensor, p: Tensor, c: Tensor,
                     key_padding_mask: Tensor | None = None) -> Tensor:
    """Causal Luna: q, k, c `[B, H, N, D]`, v `[B, H, N, D_v]`, p `[B, H, l, D]` (packed queries pq(P)),
    `key_padding_mask` bool `[B, N]`. Returns `[B, H, N, D_v]` (differentiable in q, k, v, p, c)."""
    check_dtypes("causal Luna", q, k, v, p, c)
    B, H, N, D = q.shape
    if k.shape != q.shape or c.shape != q.shape or v.shape[:3] != q.shape[:3] or p.dim() != 4 \
            or tuple(p.shape[:2]) != (B, H) or p.shape[3] != D:
        raise PatternError(f"causal Luna needs q, k, c [B, H, N, D], v [B, H, N, D_v], p [B, H, l, D]: got "
                           f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, p {list(p.shape)}, "
                           f"c {list(c.shape)}")
    if p.shape[2] > MAX_PACKED:
        raise PatternError(f"the Triton causal Luna kernel takes up to {MAX_PACKED} packed queries, got {p.shape[2]}",
                           hint="use backend='torch' or 'reference' for longer packs")
    return _luna_op(q, k, v, p, c, key_padding_mask)
