"""Bidirectional FAVOR+ in torch ops with a hand-written backward: features are formed in place, never saved.

The function is the reference's (`backends/reference/linear.py`, docs/language.md §5.2). With `x' = x d^-1/4`,
`u = x' W^T`, `a = u - |x'|^2 / 2`, the query stabiliser `c_t = max_f u_tf` and the key stabiliser
`c = max_{valid j, f} u_jf`, let `E = exp(a - c)` (zero on padded keys) and `P = E + eps`. The factor
`m^-1/2` of both feature maps cancels in the ratio, so

    KV = P_k^T V = E_k^T V + eps * sum_j v_j        z = P_k^T 1 = E_k^T 1 + eps * n_valid
    out = (P_q KV) / (P_q z)                        (0 where no key is valid)

The stabilisers are part of the function (they do not cancel through `eps`), so the backward sends
`dc = -sum G` (`G = dP * E`) to the arg-max feature (queries) or the arg-max key and feature (keys), as
autograd does through the reference's `amax`. `z` rides as a last column of `KV` (`[V, 1]`), so one product
gives numerator and denominator. Only q, k, v, the stabilisers and the small `[KV, z]` are saved; the
backward recomputes `E` with one product each. Memory O(N (m + D)) forward and backward, against
the reference's saved `[N, m]` intermediates, and about half the passes over them.

>>> import torch
>>> from patterndsl.backends.reference.features import draw_projection
>>> from patterndsl.ir.program import Favor
>>> q = k = v = torch.randn(1, 2, 10, 8)
>>> favor_attention(q, k, v, draw_projection(Favor(16), 8).float()).shape
torch.Size([1, 2, 10, 8])
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..custom import register_backward

_LOW = (torch.float16, torch.bfloat16)


def _exponent(x: Tensor, w: Tensor):
    """(u = x' W^T `[B, H, N, m]`, x' `[B, H, N, d]`, |x'|^2 / 2 `[B, H, N, 1]`)."""
    xs = x * x.shape[-1] ** -0.25
    return torch.matmul(xs, w.t()), xs, (xs * xs).sum(-1, keepdim=True) * 0.5


def _key_stabiliser(u: Tensor, valid: Tensor | None, arg: bool = False):
    """c `[B, H]` over the valid keys (0 if none is valid), or with `arg` its flat arg-max index into `[N * m]`
    (torch's max with indices is several times slower than amax: the forward takes only the value, the
    backward the index, from the same recomputed u)."""
    flat = u.flatten(-2)
    if valid is not None:
        ok = valid[:, None, :, None].expand(u.shape).flatten(-2)
        flat = flat.masked_fill(~ok, float("-inf"))
    if arg:
        return flat.argmax(-1)
    c = flat.amax(-1)
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def _features(x, w, c, valid=None, exponent=None) -> Tensor:
    """E = exp(a - c) `[B, H, N, m]` (c `[B, H, N]` per token or `[B, H]` per head), zero on padded keys;
    formed in place in `exponent` (`_exponent(x, w)`) when given."""
    u, _, half = exponent if exponent is not None else _exponent(x, w)
    shift = half + (c[..., None] if c.dim() == 3 else c[..., None, None])
    e = u.sub_(shift).exp_()
    if valid is not None:
        e.mul_(valid[:, None, :, None])
    return e


def _valid(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else ~key_padding_mask


# ------------------------------------------------------------------------------------------- custom ops
def _ones_column(x: Tensor) -> Tensor:
    """[x, 1]: a last column of ones, so one product gives the numerator and the denominator."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


@torch.library.custom_op("patterndsl::torch_favor", mutates_args=())
def _favor_op(q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor],
              eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, den, KVz = [KV, z], c_q, c_k)."""
    valid = _valid(key_padding_mask)
    xk = _exponent(k, w)
    ck = _key_stabiliser(xk[0], valid)
    ek = _features(k, w, ck, valid, exponent=xk)
    vz = _ones_column(v if valid is None else v * valid[:, None, :, None])
    if valid is not None:
        vz[..., -1] = valid[:, None, :].to(v.dtype)
    kvz = torch.matmul(ek.transpose(-1, -2), vz).add_(eps * vz.sum(-2, keepdim=True))     # [B, H, m, Dv + 1]
    del ek, xk
    xq = _exponent(q, w)
    cq = xq[0].amax(-1)                                                                     # [B, H, N_q]
    eq = _features(q, w, cq, exponent=xq)
    numden = torch.matmul(eq, kvz).add_(eps * kvz.sum(-2)[:, :, None])                     # [B, H, N_q, Dv + 1]
    den = numden[..., -1].clone()
    empty = den == 0                                                                        # no valid key
    out = numden[..., :-1].div(torch.where(empty, 1, den)[..., None]).masked_fill_(empty[..., None], 0.0)
    return out, den, kvz, cq, ck


@_favor_op.register_fake
def _(q, k, v, w, key_padding_mask, eps):
    B, H, NQ, _ = q.shape
    m, Dv = w.shape[0], v.shape[3]
    return (q.new_empty(B, H, NQ, Dv), q.new_empty(B, H, NQ), q.new_empty(B, H, m, Dv + 1), q.new_empty(B, H, NQ),
            q.new_empty(B, H))


@torch.library.custom_op("patterndsl::torch_favor_bwd", mutates_args=())
def _favor_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor],
                  out: Tensor, den: Tensor, kvz: Tensor, cq: Tensor, ck: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    valid = _valid(key_padding_mask)
    inv = torch.where(den == 0, 0, 1 / torch.where(den == 0, 1, den))
    dnum = dout * inv[..., None]                                                            # [B, H, N_q, Dv]
    g = torch.cat([dnum, (-(dout * out).sum(-1) * inv)[..., None]], -1)                    # [dnum, dden]
    # queries: P_q = E_q + eps
    xq = _exponent(q, w)
    argq = xq[0].argmax(-1)
    eq = _features(q, w, cq, exponent=xq)
    dkvz = torch.matmul(eq.transpose(-1, -2), g).add_(eps * g.sum(-2, keepdim=True))       # [B, H, m, Dv + 1]
    gq = torch.matmul(g, kvz.transpose(-1, -2)).mul_(eq)
    del eq
    dq = _input_grad(q, w, gq, argq[..., None], -gq.sum(-1, keepdim=True))
    # keys: P_k = (E_k + eps) * valid
    xk = _exponent(k, w)
    argk = _key_stabiliser(xk[0], valid, arg=True)
    ek = _features(k, w, ck, valid, exponent=xk)
    dkv = dkvz[..., :-1]
    dv = torch.matmul(ek, dkv).add_(eps * dkv.sum(-2)[:, :, None])
    if valid is not None:
        dv.mul_(valid[:, None, :, None])
    gk = torch.matmul(_ones_column(v), dkvz.transpose(-1, -2)).mul_(ek)
    del ek
    dk = _input_grad(k, w, gk, argk[..., None], -gk.sum((-1, -2))[..., None], flat=True)
    return dq, dk, dv


def _input_grad(x, w, g, arg, dc, flat=False) -> Tensor:
    """dx from G = dL/da (`[B, H, N, m]`) and the stabiliser's gradient `dc` sent to its arg-max entry."""
    xs = x * x.shape[-1] ** -0.25
    row = g.sum(-1, keepdim=True)                                    # d|x'|^2/2 term
    du = g.flatten(-2).scatter_add(-1, arg, dc).view(g.shape) if flat else g.scatter_add(-1, arg, dc)
    dxs = torch.matmul(du, w).sub_(xs * row)
    return dxs.mul_(x.shape[-1] ** -0.25)


@_favor_bwd_op.register_fake
def _(dout, q, k, v, w, key_padding_mask, out, den, kvz, cq, ck, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_backward(_favor_op, _favor_bwd_op, lambda d, x, o: (d[0], *x[:5], *o, x[5]))


# ------------------------------------------------------------------------------------------------ public
def favor_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, eps: float = 1e-4,
                    key_padding_mask: Tensor | None = None) -> Tensor:
    """Bidirectional FAVOR+ attention (differentiable in q, k, v; the projection is a constant).

    q `[B, H, N_q, D]`, k `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv dividing H: the query heads of a
    group share their kv head's `[KV, z]`), projection `[m, D]`, `key_padding_mask` bool
    `[B, N_k]` (True = ignored key). Returns `[B, H, N_q, D_v]` in q's dtype (fp16/bf16 computed in float32).
    """
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = (x.to(work) for x in (q, k, v))
    B, H, n, D = q.shape
    rows = q.reshape(B, k.shape[1], H // k.shape[1] * n, D)     # grouped heads: rows sharing one [KV, z]
    out = _favor_op(rows, k, v, projection.to(work).detach(), key_padding_mask, float(eps))[0]
    return out.reshape(B, H, n, v.shape[3]).to(dtype)
