"""Causal linear attention by chunked prefix sums, vectorised over chunks, with hand-written backwards.

The function is the reference's (`backends/reference/linear.py`): with query features `qf_t`, key features
`kf_j` stabilised at their own position (`kf_j = phi(k_j) exp(-r_j)`, `r` the running key max of FAVOR+, 0
for relu and elu1), `e` the weight of FAVOR+'s `eps` part, `w_j` 1 for an unpadded key and `V'_j = [v_j, 1]`:

    G[t, j] = (qf_t . kf_j) exp(r_j - r_t) + e qsum_t w_j         (j <= t; qsum_t = sum_f qf_tf)
    y_t = sum_j G[t, j] V'_j        out_t = y_t[:D] / y_t[D]      (0 where y_t[D] = 0)

The rows are cut into chunks of `c`; every step below is one batched product over all chunks at once:
inside a chunk the masked `[c, c]` products; each chunk's key summary `T = sum_j kf_j exp(r_j - r_last) V'_j^T`;
the states `S` (the sum of the earlier chunks' summaries at the previous chunk's last stabiliser, each
rescaled by `exp(r_ref - r_new) <= 1`: one product with the `[nc, nc]` matrix of those factors); the rows'
reads of their state. The eps part is one prefix sum over the sequence (triangular products per chunk).
Backward, with `g_t = dL/dy_t = [dout_t, -dout_t . out_t] / y_t[D]`, has the same shape in reverse:

    dqf_t = sum_j (g_t . V'_j) exp(r_j - r_t) kf_j + e (g_t . sum_{j<=t} w_j V'_j)
    dkf_j = sum_{t>=j} (g_t . V'_j) exp(r_j - r_t) qf_t         dV'_j = sum_{t>=j} G[t, j] g_t
    dr_t  = -g_t . (y_t - e qsum_t sum_{j<=t} w_j V'_j)          (r's total effect: kf_j exp(r_j) is free of r)

the sums over `t >= j` of later chunks through reverse states `P = sum_t exp(r_ref - r_t) qf_t g_t^T`. Every
exponent is <= 0 (r is nondecreasing), so nothing overflows. With FAVOR+ and a constant projection the
features are formed inside the op and differentiated by hand (`favor_causal`, one op from q, k, v); other
maps (relu, elu1, a learned projection) reach the core op through autograd of the reference's features.

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

from ..custom import register_backward

_LOW = (torch.float16, torch.bfloat16)


def choose_chunk(n: int, m: int, dv: int) -> int:
    """The chunk of the scan: the intra-chunk products cost `2 c (m + Dv)` per row against the state's fixed
    `4 m Dv`; below 64 rows the products are too small to run near peak, above 128 they cost more than the
    states. Measured on 2 CPU cores at m = 256, D = 64 (benchmarks/linear.py): 64 for N <= 4k, 128 beyond."""
    if n <= 64:
        return max(n, 1)
    return 64 if n <= 4096 or m + dv < 192 else 128


def _pad_rows(x: Tensor, pad: int) -> Tensor:
    return x if pad == 0 else torch.nn.functional.pad(x, (0, 0, 0, pad))


def _chunked(x: Tensor, nc: int, c: int) -> Tensor:
    """`[Z, N, f]` -> `[Z, nc, c, f]` (rows padded with zeros)."""
    return _pad_rows(x, nc * c - x.shape[1]).view(x.shape[0], nc, c, x.shape[2])


def _stabilisers(r: Tensor, nc: int, c: int):
    """(R `[Z, nc, c]` padded with the last value, each chunk's last `rl` and reference `rref` `[Z, nc]`)."""
    pad = nc * c - r.shape[1]
    R = (r if pad == 0 else torch.cat([r, r[:, -1:].expand(-1, pad)], 1)).view(r.shape[0], nc, c)
    rl = R[..., -1]
    return R, rl, torch.cat([R[:, :1, 0], rl[:, :-1]], 1)


_CARRY_MATRIX_MAX = 256     # up to this many chunks the carry is one product; beyond, a loop over chunks


def _carry(T: Tensor, level: Tensor | None, ref: Tensor, reverse: bool) -> Tensor:
    """Exclusive sums over chunks (dim 1) of `T [Z, nc, m, f]`, each term rescaled from its own stabiliser to
    the target's: forward `out_i = sum_{i' < i} exp(level_i' - ref_i) T_i'`, reverse `out_i = sum_{i' > i}
    exp(ref_i - level_i') T_i'` (levels and refs `[Z, nc]` nondecreasing, so every factor is <= 1; `level`
    None: no rescaling). One product with the `[nc, nc]` matrix of factors (torch's cumsum over a middle dim
    is slower), or for many chunks a loop passing the carry between neighbouring stabilisers."""
    Z, nc = T.shape[:2]
    if nc <= _CARRY_MATRIX_MAX:
        i = torch.arange(nc, device=T.device)
        keep = (i[None, :] > i[:, None]) if reverse else (i[None, :] < i[:, None])          # [target, source]
        if level is None:
            L = keep.to(T.dtype).expand(Z, nc, nc)
        else:
            diff = (ref[:, :, None] - level[:, None, :]) if reverse else (level[:, None, :] - ref[:, :, None])
            L = torch.exp(diff.masked_fill_(~keep, float("-inf")))
        return torch.matmul(L, T.reshape(Z, nc, -1)).view(T.shape)
    out = torch.zeros_like(T)
    sign = -1 if reverse else 1
    for i in (range(nc - 2, -1, -1) if reverse else range(1, nc)):
        j = i - sign
        if level is None:
            torch.add(T[:, j], out[:, j], out=out[:, i])
            continue
        term = T[:, j] * torch.exp(sign * (level[:, j] - ref[:, i]))[:, None, None]
        out[:, i] = torch.addcmul(term, torch.exp(sign * (ref[:, j] - ref[:, i]))[:, None, None], out[:, j])
    return out


def _prefix(x: Tensor, c: int, reverse: bool = False) -> Tensor:
    """Inclusive prefix sums of `x [Z, N, f]` over N (suffix sums with `reverse`): a triangular product inside
    chunks of `c` rows and the chunk totals carried over (faster than torch's cumsum over a middle dim)."""
    Z, N, f = x.shape
    nc = -(-N // c)
    X = _chunked(x, nc, c)
    tri = torch.ones(c, c, dtype=x.dtype, device=x.device)
    tri = tri.triu() if reverse else tri.tril()
    inc = torch.matmul(tri, X)
    tot = (inc[:, :, 0] if reverse else inc[:, :, -1])[:, :, None, None]
    inc += _carry(tot, None, None, reverse).view(Z, nc, 1, f)
    return inc.view(Z, nc * c, f)[:, :N]


def _scan_fwd(qf, kf, r, vp, wv, e: float, c: int, decaying: bool):
    """(out `[Z, N, Dv]`, y `[Z, N, Dv + 1]`, states, intra products, decays) of the core; qf, kf `[Z, N, m]`,
    r, wv `[Z, N]`, vp = V' `[Z, N, Dv + 1]`."""
    Z, N, m = qf.shape
    nc = -(-N // c)
    Q, K, V = _chunked(qf, nc, c), _chunked(kf, nc, c), _chunked(vp, nc, c)
    R, rl, rref = _stabilisers(r, nc, c)
    tri = torch.ones(c, c, dtype=torch.bool, device=qf.device).tril()
    if decaying:
        decay = torch.exp((R[..., None, :] - R[..., :, None]).masked_fill_(~tri, float("-inf")))
    else:
        decay = tri.to(qf.dtype).expand(Z, nc, c, c)
    A = torch.matmul(Q, K.transpose(-1, -2)).mul_(decay)                            # [Z, nc, t, j]
    Y = torch.matmul(A, V)
    Vs = V * torch.exp(R - rl[..., None])[..., None] if decaying else V              # scale the narrow side
    S = _carry(torch.matmul(K.transpose(-1, -2), Vs), rl if decaying else None, rref, False)
    QS = torch.matmul(Q, S)
    Y += QS.mul_(torch.exp(rref[..., None] - R)[..., None]) if decaying else QS
    y = Y.view(Z, nc * c, -1)[:, :N]
    if e:
        y = y + e * qf.sum(-1, keepdim=True) * _prefix(vp * wv[..., None], c)
    den = y[..., -1]
    empty = den == 0
    out = (y[..., :-1] / torch.where(empty, 1, den)[..., None]).masked_fill_(empty[..., None], 0.0)
    return out, y.contiguous(), S, A, decay.contiguous()


def _scan_bwd(dout, qf, kf, r, vp, wv, e: float, c: int, decaying: bool, out, y, S, A, decay):
    """(dqf, dkf, dr, dV') of the core; dr is r's total effect (see the module docstring)."""
    Z, N, m = qf.shape
    nc = S.shape[1]
    den = y[..., -1]
    inv = torch.where(den == 0, 0, 1 / torch.where(den == 0, 1, den))
    g = torch.cat([dout * inv[..., None], (-(dout * out).sum(-1) * inv)[..., None]], -1)     # dL/dy
    Q, K, V, Gc = (_chunked(x, nc, c) for x in (qf, kf, vp, g))
    R, rl, rref = _stabilisers(r, nc, c)
    dgd = torch.matmul(Gc, V.transpose(-1, -2)).mul_(decay)                        # [Z, nc, t, j]
    Gs = Gc * torch.exp(rref[..., None] - R)[..., None] if decaying else Gc          # rows read states: scaled
    dQ = torch.matmul(Gs, S.transpose(-1, -2)).add_(torch.matmul(dgd, K))
    P = _carry(torch.matmul(Q.transpose(-1, -2), Gs), rref if decaying else None, rl, True)   # [Z, nc, m, Dv + 1]
    back = torch.exp(R - rl[..., None])[..., None] if decaying else None               # keys into P: scaled
    dK = torch.matmul(V * back if decaying else V, P.transpose(-1, -2)).add_(torch.matmul(dgd.transpose(-1, -2), Q))
    dV = torch.matmul(K, P)
    if decaying:
        dV.mul_(back)
    dV += torch.matmul(A.transpose(-1, -2), Gc)
    dqf, dkf, dvp = (x.view(Z, nc * c, -1)[:, :N] for x in (dQ, dK, dV))
    if not e:
        return dqf, dkf, -(g * y).sum(-1), dvp[..., :-1]
    qsum = qf.sum(-1)
    sv_inc = _prefix(vp * wv[..., None], c)
    dr = -(g * (y - e * qsum[..., None] * sv_inc)).sum(-1)
    dqf += (e * (g * sv_inc).sum(-1))[..., None]
    dvp += _prefix(qsum[..., None] * g, c, reverse=True).mul_(e * wv[..., None])         # sum_{t >= j}
    return dqf, dkf, dr, dvp[..., :-1]


# ---------------------------------------------------------------------------------------- FAVOR+ features
def _favor_features(q, k, w, wv, eps: float):
    """(qf, kf, r, arg-max of each query's u, of each key's u, cummax index of r), all from q, k `[Z, N, D]`
    (k zero on padded keys), w `[m, D]`: the reference's query map and `_key_terms` (linear_scan.py)."""
    m, D = w.shape
    s, sc = m ** -0.5, D ** -0.25
    xq, xk = q * sc, k * sc
    uq = torch.matmul(xq, w.t())
    cq, iq = uq.max(-1)
    qf = uq.sub_(((xq * xq).sum(-1) * 0.5 + cq)[..., None]).exp_().add_(eps).mul_(s)
    uk = torch.matmul(xk, w.t())
    ok = wv > 0
    rk, ik = uk.max(-1)
    r, ir = rk.masked_fill_(~ok, float("-inf")).cummax(-1)
    seen = torch.isfinite(r)
    first = torch.where(seen, r, float("inf")).amin(-1, keepdim=True)
    r = torch.where(seen, r, torch.where(torch.isfinite(first), first, 0.0))   # before any key: no effect
    kf = uk.sub_(((xk * xk).sum(-1) * 0.5 + r)[..., None])
    if not bool(ok.all()):
        kf.masked_fill_(~ok[..., None], float("-inf"))
    return qf, kf.exp_().mul_(s), r, iq, ik, ir


def _favor_feature_grads(q, k, w, eps: float, qf, kf, iq, ik, ir, dqf, dkf, dr):
    """(dq, dk) from the features' gradients and r's total one; each stabiliser's gradient goes to its
    arg-max entry (as autograd does through the reference's max, ties aside)."""
    m, D = w.shape
    s, sc = m ** -0.5, D ** -0.25
    dA = dqf.mul(qf - s * eps)                                          # dL/da of the queries
    dc = -dA.sum(-1, keepdim=True)
    dq = torch.matmul(dA.scatter_add_(-1, iq[..., None], dc), w).add_(q * (sc * dc)).mul_(sc)
    dak = dkf.mul(kf)                                                   # dL/da of the keys
    row = dak.sum(-1, keepdim=True)
    drk = torch.zeros_like(dr).scatter_add_(-1, ir, dr)                 # r_t = max over keys j <= t, features
    dk = torch.matmul(dak.scatter_add_(-1, ik[..., None], drk[..., None]), w).sub_(k * (sc * row)).mul_(sc)
    return dq, dk


# ------------------------------------------------------------------------------------------- custom ops
def _ones_col(v: Tensor) -> Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


def _fake_core(v, n, m, c):
    Z, N, Dv = v.shape
    nc = -(-N // c)
    return (v.new_empty(Z, N, Dv), v.new_empty(Z, N, Dv + 1), v.new_empty(Z, nc, m, Dv + 1),
            v.new_empty(Z, nc, c, c), v.new_empty(Z, nc, c, c))


@torch.library.custom_op("patterndsl::torch_causal_linear", mutates_args=())
def _core_op(qf: Tensor, kf: Tensor, r: Tensor, v: Tensor, wv: Tensor, e: float, chunk: int,
             decaying: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, y, states, intra products, decays) of the core from features (see the module docstring)."""
    return _scan_fwd(qf, kf, r, _ones_col(v), wv, e, chunk, decaying)


@_core_op.register_fake
def _(qf, kf, r, v, wv, e, chunk, decaying):
    return _fake_core(v, qf.shape[1], qf.shape[2], chunk)


@torch.library.custom_op("patterndsl::torch_causal_linear_bwd", mutates_args=())
def _core_bwd_op(dout: Tensor, qf: Tensor, kf: Tensor, r: Tensor, v: Tensor, wv: Tensor, e: float, chunk: int,
                 decaying: bool, out: Tensor, y: Tensor, S: Tensor, A: Tensor,
                 decay: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dqf, dkf, dr, dv = _scan_bwd(dout.contiguous(), qf, kf, r, _ones_col(v), wv, e, chunk, decaying,
                                 out, y, S, A, decay)
    return dqf.contiguous(), dkf.contiguous(), dr + (kf * dkf).sum(-1), dv.contiguous()   # r as an input of kf


@_core_bwd_op.register_fake
def _(dout, qf, kf, r, v, wv, e, chunk, decaying, out, y, S, A, decay):
    return qf.new_empty(qf.shape), kf.new_empty(kf.shape), r.new_empty(r.shape), v.new_empty(v.shape)


register_backward(_core_op, _core_bwd_op, lambda d, x, o: (d[0], *x, *o))


@torch.library.custom_op("patterndsl::torch_favor_causal", mutates_args=())
def _favor_op(q: Tensor, k: Tensor, v: Tensor, w: Tensor, wv: Tensor, eps: float, chunk: int) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Causal FAVOR+ from q, k, v: (out, y, states, intra products, decays, qf, kf, r, the three arg-maxes)."""
    qf, kf, r, iq, ik, ir = _favor_features(q, k, w, wv, eps)
    core = _scan_fwd(qf, kf, r, _ones_col(v), wv, w.shape[0] ** -0.5 * eps, chunk, True)
    return (*core, qf, kf, r, iq, ik, ir)


@_favor_op.register_fake
def _(q, k, v, w, wv, eps, chunk):
    Z, N, _ = q.shape
    m = w.shape[0]
    idx = [q.new_empty(Z, N, dtype=torch.long) for _ in range(3)]
    return (*_fake_core(v, N, m, chunk), q.new_empty(Z, N, m), q.new_empty(Z, N, m), q.new_empty(Z, N), *idx)


@torch.library.custom_op("patterndsl::torch_favor_causal_bwd", mutates_args=())
def _favor_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, wv: Tensor, eps: float, chunk: int,
                  out: Tensor, y: Tensor, S: Tensor, A: Tensor, decay: Tensor, qf: Tensor, kf: Tensor, r: Tensor,
                  iq: Tensor, ik: Tensor, ir: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    e = w.shape[0] ** -0.5 * eps
    dqf, dkf, dr, dv = _scan_bwd(dout.contiguous(), qf, kf, r, _ones_col(v), wv, e, chunk, True, out, y, S, A, decay)
    dq, dk = _favor_feature_grads(q, k, w, eps, qf, kf, iq, ik, ir, dqf, dkf, dr)
    return dq, dk, dv.contiguous()


@_favor_bwd_op.register_fake
def _(dout, q, k, v, w, wv, eps, chunk, out, y, S, A, decay, qf, kf, r, iq, ik, ir):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_backward(_favor_op, _favor_bwd_op, lambda d, x, o: (d[0], *x, *o))


# ------------------------------------------------------------------------------------------------ public
def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map, projection: Tensor | None,
                            key_padding_mask: Tensor | None = None, chunk: int | None = None,
                            q_offset: int = 0) -> Tensor:
    """Causal linear attention (FAVOR+, relu, elu1), equal to the reference's: q `[B, H, N_q, D]`, k `[B, H_kv,
    N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv dividing H), projection `[m, D]` (None for elu1),
    `key_padding_mask` `[B, N_k]`; query row i sits at position `q_offset + i`. `chunk` None: `choose_chunk`.
    Returns `[B, H, N_q, D_v]` in q's dtype (fp16/bf16 computed in float32); differentiable in q, k, v (and
    the projection, through the reference's features, when it requires grad)."""
    from ...ir.program import Favor
    from ..reference.linear import align_keys
    from .linear_scan import _key_terms, _query_terms
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    w = projection.to(work) if projection is not None else None
    B, H, n_q, D = q.shape
    if n_q == 0 or B == 0 or H == 0:
        return q.new_zeros(B, H, n_q, v.shape[3]).to(dtype) + (q.sum() + k.sum() + v.sum()) * 0
    o, Hk = int(q_offset), k.shape[1]
    n = o + n_q
    valid = (torch.ones(B, k.shape[2], dtype=torch.bool, device=k.device) if key_padding_mask is None
             else ~key_padding_mask.to(k.device))
    padded = key_padding_mask is not None or k.shape[2] < n
    k, v, valid = align_keys(n, k, v, valid)
    if Hk != H:                                    # grouped heads: each query head reads its kv head's keys
        k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    if padded:
        k, v = (torch.where(valid[:, None, :, None], x, 0.0) for x in (k, v))
    k, v = (x.reshape(B * H, n, x.shape[3]) for x in (k, v))
    q = (torch.nn.functional.pad(q, (0, 0, o, 0)) if o else q).reshape(B * H, n, D)   # rows before o: discarded
    wv = valid[:, None].expand(B, H, n).reshape(B * H, n).to(work)
    m = w.shape[0] if w is not None else D
    c = int(max(1, chunk)) if chunk else choose_chunk(n, m, v.shape[2])
    if isinstance(feature_map, Favor) and not w.requires_grad:
        out = _favor_op(q, k, v, w, wv, float(feature_map.eps), c)[0]
    else:
        kf, r, e = _key_terms(k[:, None, None], valid[:, None].expand(B, H, n).reshape(B * H, n), feature_map, w,
                              None)
        qf = _query_terms(q, feature_map, w)[0]
        out = _core_op(qf, kf[:, 0, 0], r[:, 0, 0], v, wv, float(e), c, isinstance(feature_map, Favor))[0]
    return out.view(B, H, n, -1)[:, :, o:].to(dtype)
