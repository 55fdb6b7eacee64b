"""Causal linear attention by chunked prefix sums with a hand-written backward (a `torch.library` custom op).

The function is the reference's (`backends/reference/linear.py`): with query features `qf_t`, key features
`kf_j` stabilised at their own position (`kf_j = phi(k_j) exp(-r_j)`, `r` the running key max of FAVOR+, 0
for relu and elu1), `e` the weight of FAVOR+'s `eps` part, `w_j` 1 for an unpadded key and `V'_j = [v_j, 1]`:

    G[t, j] = (qf_t . kf_j) exp(r_j - r_t) + e qsum_t w_j         (j <= t; qsum_t = sum_f qf_tf)
    y_t = sum_j G[t, j] V'_j        out_t = y_t[:D] / y_t[D]      (0 where y_t[D] = 0)

Features come from the reference's maps under autograd (O(N m) elementwise work); the O(N c (m + D)) core
runs here. Forward: chunks of `chunk` rows, a state `S = sum_j kf_j exp(r_j - r_ref) V'_j^T` carried at the
previous chunk's last stabiliser. Backward, with `g_t = dL/dy_t = [dout_t, -dout_t . out_t] / y_t[D]`:

    dqf_t = sum_j (g_t . V'_j) exp(r_j - r_t) kf_j + e (g_t . sum_{j<=t} w_j V'_j)
    dkf_j = sum_{t>=j} (g_t . V'_j) exp(r_j - r_t) qf_t         dV'_j = sum_{t>=j} G[t, j] g_t
    dr_t  = -g_t . (y_t - e qsum_t sum_{j<=t} w_j V'_j) + kf_t . dkf_t

the sums over `t >= j` by a reverse scan of `P = sum_t exp(r_ref - r_t) qf_t g_t^T` (the forward saves its
chunk states). Both scans keep every exponent <= 0 (r is nondecreasing), so nothing overflows.

>>> import torch
>>> from patterndsl.backends.reference.features import draw_projection
>>> from patterndsl.ir.program import Favor
>>> q = k = v = torch.randn(1, 2, 10, 8)
>>> causal_linear_attention(q, k, v, Favor(16), draw_projection(Favor(16), 8).float(), chunk=4).shape
torch.Size([1, 2, 10, 8])
"""
from __future__ import annotations

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)


def _ones_col(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


def _decay(rc: Tensor) -> Tensor:
    """exp(r_j - r_t) for j <= t, else 0: `[B, H, c, c]`."""
    n = rc.shape[-1]
    tri = torch.ones(n, n, dtype=torch.bool, device=rc.device).tril()
    return torch.exp((rc[..., None, :] - rc[..., :, None]).masked_fill(~tri, float("-inf")))


def _scan_fwd(qf, kf, r, v, w, e: float, chunk: int):
    """(out, y, chunk states, decays). The eps part of y, `e qsum_t sum_{j<=t} w_j V'_j`, is one prefix sum
    over the whole sequence; the loop carries only the decaying part."""
    B, H, N, m = qf.shape
    vp = _ones_col(v)
    S = v.new_zeros(B, H, m, vp.shape[-1])
    starts = range(0, N, chunk)
    states = v.new_empty(B, H, len(starts), m, vp.shape[-1])
    decays = v.new_empty(B, H, len(starts), chunk, chunk)
    y = e * qf.sum(-1, keepdim=True) * torch.cumsum(vp * w[:, None, :, None], dim=2)
    r_ref = r[..., :1]
    for ci, s in enumerate(starts):
        t = slice(s, min(s + chunk, N))
        qc, kc, vc, rc = qf[:, :, t], kf[:, :, t], vp[:, :, t], r[:, :, t]
        n = qc.shape[2]
        states[:, :, ci] = S
        decay = decays[:, :, ci, :n, :n]
        decay.copy_(_decay(rc))
        g = torch.matmul(qc, kc.transpose(-1, -2)).mul_(decay)
        y[:, :, t] += torch.matmul(g, vc).add_(torch.exp(r_ref - rc)[..., None] * torch.matmul(qc, S))
        r_new = rc[..., -1:]
        S = torch.exp(r_ref - r_new)[..., None] * S + torch.matmul(
            (kc * torch.exp(rc - r_new)[..., None]).transpose(-1, -2), vc)
        r_ref = r_new
    den = y[..., -1]
    empty = den == 0
    out = y[..., :-1] / torch.where(empty, 1, den)[..., None]
    return out.masked_fill_(empty[..., None], 0.0), y, states, decays


def _scan_bwd(dout, qf, kf, r, v, w, e: float, chunk: int, out, y, states, decays):
    B, H, N, m = qf.shape
    vp = _ones_col(v)
    den = y[..., -1]
    inv = torch.where(den == 0, 0, 1 / torch.where(den == 0, 1, den))
    g = torch.cat([dout * inv[..., None], (-(dout * out).sum(-1) * inv)[..., None]], -1)     # dL/dy
    qsum = qf.sum(-1)
    sv_inc = torch.cumsum(vp * w[:, None, :, None], dim=2)
    dr = -(g * (y - e * qsum[..., None] * sv_inc)).sum(-1)
    dqf = (e * (g * sv_inc).sum(-1))[..., None].expand(qf.shape).clone()
    qg = torch.flip(torch.cumsum(torch.flip(qsum[..., None] * g, [2]), 2), [2])           # sum_{t >= j}
    dvp = e * w[:, None, :, None] * qg
    dkf = torch.empty_like(kf)
    P = v.new_zeros(B, H, m, vp.shape[-1])
    for ci in reversed(range(states.shape[2])):
        s = ci * chunk
        t = slice(s, min(s + chunk, N))
        qc, kc, vc, rc, gc = qf[:, :, t], kf[:, :, t], vp[:, :, t], r[:, :, t], g[:, :, t]
        n = qc.shape[2]
        r_ref = r[..., s - 1:s] if s > 0 else rc[..., :1]
        r_last = rc[..., -1:]
        decay = decays[:, :, ci, :n, :n]
        gexp = torch.matmul(qc, kc.transpose(-1, -2)).mul_(decay)                      # [t, j]
        dgd = torch.matmul(gc, vc.transpose(-1, -2)).mul_(decay)
        dqf[:, :, t] += torch.matmul(dgd, kc).add_(torch.exp(r_ref - rc)[..., None] * torch.matmul(
            gc, states[:, :, ci].transpose(-1, -2)))
        back = torch.exp(rc - r_last)[..., None]
        dk = torch.matmul(dgd.transpose(-1, -2), qc).add_(back * torch.matmul(vc, P.transpose(-1, -2)))
        dkf[:, :, t] = dk
        dvp[:, :, t] += torch.matmul(gexp.transpose(-1, -2), gc).add_(torch.matmul(kc * back, P))
        P = torch.exp(r_ref - r_last)[..., None] * P + torch.matmul(
            (qc * torch.exp(r_ref - rc)[..., None]).transpose(-1, -2), gc)
        dr[:, :, t] += (kc * dk).sum(-1)
    return dqf, dkf, dr, dvp[..., :-1]


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("patterndsl::torch_causal_linear", mutates_args=())
def _core_op(qf: Tensor, kf: Tensor, r: Tensor, v: Tensor, w: Tensor, e: float,
             chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, y, chunk states, chunk decays) of the core (see the module docstring)."""
    return _scan_fwd(qf, kf, r, v, w, e, chunk)


@_core_op.register_fake
def _(qf, kf, r, v, w, e, chunk):
    B, H, N, m = qf.shape
    nc = -(-N // chunk)
    return (v.new_empty(v.shape), v.new_empty(B, H, N, v.shape[3] + 1), v.new_empty(B, H, nc, m, v.shape[3] + 1),
            v.new_empty(B, H, nc, chunk, chunk))


@torch.library.custom_op("patterndsl::torch_causal_linear_bwd", mutates_args=())
def _core_bwd_op(dout: Tensor, qf: Tensor, kf: Tensor, r: Tensor, v: Tensor, w: Tensor, e: float, chunk: int,
                 out: Tensor, y: Tensor, states: Tensor, decays: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _scan_bwd(dout.contiguous(), qf, kf, r, v, w, e, chunk, out, y, states, decays)


@_core_bwd_op.register_fake
def _(dout, qf, kf, r, v, w, e, chunk, out, y, states, decays):
    return qf.new_empty(qf.shape), kf.new_empty(kf.shape), r.new_empty(r.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    qf, kf, r, v, w, e, chunk = inputs
    out, y, states, decays = output
    ctx.save_for_backward(qf, kf, r, v, w, out, y, states, decays)
    ctx.e, ctx.chunk = e, chunk


def _backward(ctx, dout, *_):
    qf, kf, r, v, w, out, y, states, decays = ctx.saved_tensors
    dqf, dkf, dr, dv = _core_bwd_op(dout, qf, kf, r, v, w, ctx.e, ctx.chunk, out, y, states, decays)
    return dqf, dkf, dr, dv, None, None, None


_core_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------ public
def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map, projection: Tensor | None,
                            key_padding_mask: Tensor | None = None, chunk: int = 128) -> Tensor:
    """Causal linear attention (FAVOR+, relu, elu1), equal to the reference's: q `[B, H, N_q, D]`, k `[B, H,
    N_k, D]`, v `[B, H, N_k, D_v]`, projection `[m, D]` (None for elu1), `key_padding_mask` `[B, N_k]`.
    Returns `[B, H, N_q, D_v]` in q's dtype (fp16/bf16 computed in float32); differentiable in q, k, v (and
    the projection, through the features)."""
    from ..reference.linear import align_keys
    from .linear_scan import _key_terms, _query_terms
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    w = projection.to(work) if projection is not None else None
    B, _, n_k = k.shape[:3]
    valid = (torch.ones(B, n_k, dtype=torch.bool, device=k.device) if key_padding_mask is None
             else ~key_padding_mask.to(k.device))
    if q.shape[2] == 0 or B == 0 or q.shape[1] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[3]).to(dtype) + (q.sum() + k.sum() + v.sum()) * 0
    k, v, valid = align_keys(q.shape[2], k, v, valid)
    k, v = (torch.where(valid[:, None, :, None], x, 0.0) for x in (k, v))
    kf, r, e = (x[:, :, 0] if isinstance(x, Tensor) else x for x in _key_terms(k[:, :, None], valid, feature_map,
                                                                                w, None))
    qf = _query_terms(q, feature_map, w)[0]
    out = _core_op(qf, kf, r, v, valid.to(work), float(e), int(max(1, chunk)))[0]
    return out.to(dtype)
