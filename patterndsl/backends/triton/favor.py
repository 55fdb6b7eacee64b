"""Linear attention (FAVOR+, relu features, elu+1) on the fused Triton kernels, as a custom op with autograd.

The feature map never materialises `[B, H, N, m]`: the kernels compute features per chunk and feature block
(favor_fwd.py, favor_bwd.py). FAVOR+ stabilisers are the per-query max over features of `x' W^T` and, for
keys, one max over all valid keys (non-causal) or its running max over keys `j <= t` (causal: no query sees
a future key); they are constants for the gradient, as in performer-pytorch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...errors import PatternError
from ...ir.program import Elu1, Favor, ReluFeatures
from ..custom import register_backward
from .favor_bwd import favor_bwd
from .favor_fwd import ELU1, FAVOR, RELU, favor_fwd, favor_stats

RELU_EPS = 1e-3


def _scale_x(kind: int, d: int) -> float:
    return 1.0 if kind == ELU1 else d ** -0.25


class Stabilisers(NamedTuple):
    """FAVOR+ maxima (float32) and where they sit: `cq [B, H, N_q]` per query, `ck [B, H, N_k]` for the keys
    (one value, or the running max), `q_arg`/`k_arg` the arg-max feature per token, `j_star` the key holding
    `ck` (`[B, H, 1]`, or `[B, H, N_k]` when causal)."""
    cq: Tensor
    ck: Tensor
    q_arg: Tensor | None = None
    k_arg: Tensor | None = None
    j_star: Tensor | None = None


def stabilisers(q, k, w, key_padding_mask, kind: int, causal: bool) -> Stabilisers:
    """The stabilisers of FAVOR+ (padded keys excluded); zeros for the other feature maps."""
    if kind != FAVOR:
        return Stabilisers(q.new_zeros(q.shape[:3], dtype=torch.float32),
                           k.new_zeros(k.shape[:3], dtype=torch.float32))
    sx = _scale_x(kind, q.shape[3])
    (cq, q_arg), (mk, k_arg) = favor_stats(q, w, sx), favor_stats(k, w, sx)
    if key_padding_mask is not None:
        mk = mk.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    if causal:
        ck, j_star = torch.cummax(mk, dim=-1)
        seen = torch.isfinite(ck)
        # before the first valid key the stabiliser only scales zero contributions: any finite value that
        # keeps it non-decreasing will do
        first = ck.gather(-1, seen.to(torch.int8).argmax(-1, keepdim=True))
        ck = torch.where(seen, ck, torch.where(torch.isfinite(first), first, 0.0))
    else:
        c, j_star = mk.max(-1, keepdim=True)
        ck = torch.where(torch.isfinite(c), c, 0.0).expand_as(mk)
    return Stabilisers(cq.contiguous(), ck.contiguous(), q_arg, k_arg, j_star)


# ------------------------------------------------------------------------------------------- custom ops
def _kpm(key_padding_mask):
    return key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None


@torch.library.custom_op("patterndsl::triton_linear", mutates_args=())
def _linear_op(q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor], kind: int,
               causal: bool, eps: float) -> tuple[Tensor, Tensor]:
    q, k, v, w = q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    stab = stabilisers(q, k, w, key_padding_mask, kind, causal)
    num, den = favor_fwd(q, k, v, w, stab.cq, stab.ck, _kpm(key_padding_mask), kind, causal, eps,
                         _scale_x(kind, q.shape[3]))
    out = torch.where((den > 0)[..., None], num / torch.where(den > 0, den, 1.0)[..., None], 0.0)
    return out.to(q.dtype), den


@_linear_op.register_fake
def _(q, k, v, w, key_padding_mask, kind, causal, eps):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("patterndsl::triton_linear_bwd", mutates_args=())
def _linear_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor],
                   out: Tensor, den: Tensor, kind: int, causal: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, w = q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    stab = stabilisers(q, k, w, key_padding_mask, kind, causal)       # recomputed: cheaper than saved
    return favor_bwd(dout.contiguous(), q, k, v, w, stab, _kpm(key_padding_mask), out, den, kind, causal, eps,
                     _scale_x(kind, q.shape[3]))


@_linear_bwd_op.register_fake
def _(dout, q, k, v, w, key_padding_mask, out, den, kind, causal, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)   # contiguous, like the kernels'


register_backward(_linear_op, _linear_bwd_op, lambda d, x, o: (d[0], *x[:5], *o, *x[5:]))


def _align_keys(n_q: int, k, v, key_padding_mask):
    """Causal: keys past the last query are never seen (cut); missing keys count as padding."""
    n_k = k.shape[2]
    if n_k == n_q:
        return k, v, key_padding_mask
    if n_k > n_q:
        return k[:, :, :n_q], v[:, :, :n_q], None if key_padding_mask is None else key_padding_mask[:, :n_q]
    pad = n_q - n_k
    kpm = key_padding_mask if key_padding_mask is not None else torch.zeros(k.shape[0], n_k, dtype=torch.bool,
                                                                            device=k.device)
    return (torch.nn.functional.pad(k, (0, 0, 0, pad)), torch.nn.functional.pad(v, (0, 0, 0, pad)),
            torch.nn.functional.pad(kpm, (0, pad), value=True))


# ------------------------------------------------------------------------------------------------ public
def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map, projection: Tensor | None, causal: bool = False,
                     key_padding_mask: Tensor | None = None) -> Tensor:
    """`phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)` with the feature map fused in (differentiable in q, k, v).

    q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]`; `feature_map` a `Favor`, `ReluFeatures` or
    `Elu1`; `projection` `[m, D]` (None for Elu1; not trained); `causal` sums keys `j <= t` only (keys past the
    last query are cut, missing ones count as padding); `key_padding_mask` bool `[B, N_k]` (True = ignored
    key). Rows with no valid key output zeros. Math in float32 (float64 inputs too). Returns `[B, H, N_q, D_v]`.
    """
    if isinstance(feature_map, Favor):
        kind, eps = FAVOR, float(feature_map.eps)
    elif isinstance(feature_map, ReluFeatures):
        kind, eps = RELU, RELU_EPS
    elif isinstance(feature_map, Elu1):
        kind, eps = ELU1, 0.0
        projection = torch.eye(q.shape[3], dtype=q.dtype, device=q.device)
    else:
        raise PatternError(f"no Triton kernel for the feature map {type(feature_map).__name__}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or not (
            q.dtype == k.dtype == v.dtype):
        raise PatternError(f"linear attention takes float q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or v.shape[:3] != k.shape[:3]:
        raise PatternError(f"linear attention needs k like q [B, H, N_k, D] and v [B, H, N_k, D_v]: "
                           f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if projection is None or projection.dim() != 2 or projection.shape[1] != q.shape[3]:
        got = "None" if projection is None else str(list(projection.shape))
        raise PatternError(f"projection must be a tensor [m, {q.shape[3]}] (features, head_dim), got {got}")
    w = projection.detach().to(q.dtype)
    if causal:
        k, v, key_padding_mask = _align_keys(q.shape[2], k, v, key_padding_mask)
    return _linear_op(q, k, v, w, key_padding_mask, kind, bool(causal), eps)[0]
