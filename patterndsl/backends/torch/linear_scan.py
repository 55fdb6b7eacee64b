"""Linear attention in torch ops (FAVOR+, relu, elu1): two products when bidirectional, a chunked scan when causal.

Computes the reference's function (`backends/reference/linear.py`, its naive twin) in O(N) memory.
Bidirectional: `out = phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`. Causal, by prefix sums over chunks of
`chunk` keys: for FAVOR+ the key features at time t are stabilised by the running max `r_t` of the keys seen
so far, `phi_t(k_j) = m^-1/2 (exp(a_j - r_t) + eps)`; the state `S = sum_j exp(a_j - r_ref) v_j^T` is kept at
the stabiliser `r_ref` of the last key absorbed and rescaled by `exp(r_ref - r_t) <= 1`; inside a chunk
`exp(a_j - r_t)` is formed as `exp(a_j - r_j) exp(r_j - r_t)`, both factors <= 1, so nothing overflows.

The state (`ScanState`: the sums and the running max) is one per (batch row, kv head): with grouped-query
attention the G query heads of a group read it together (queries are `[B, H_kv, G, N, .]`, keys
`[B, H_kv, 1, N, .]`). It is also what a decode step carries (`patterndsl.decode`): `absorb` adds keys,
`causal_scan` runs rows on top of a state, `read` gives rows that see the whole state. With a query offset
o, the keys before position o are absorbed first and rows run from there.

Padded keys are replaced by zeros before any product (a NaN there reaches no output); a NaN in a later key of
the same chunk still reaches earlier rows through the chunk's products. fp16/bf16 inputs are computed in
float32; float32 and float64 stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ir.program import Favor
from ..reference.features import favor_exponent, favor_features
from ..reference.linear import align_keys, key_features, query_features, ratio, valid_keys

_LOW = (torch.float16, torch.bfloat16)


@dataclass
class ScanState:
    """Keys absorbed so far, per (batch row, kv head): `S [B, Hk, 1, m, Dv]` and `z [B, Hk, 1, m]` (the decaying
    exp part at stabiliser `r_ref [B, Hk, 1, 1]`, -inf before any key), `sv [B, Hk, 1, Dv]` and
    `cnt [B, 1, 1, 1]` (the eps part: sums of the unpadded values and their count)."""
    S: torch.Tensor
    z: torch.Tensor
    sv: torch.Tensor
    cnt: torch.Tensor
    r_ref: torch.Tensor

    @staticmethod
    def empty(B: int, Hk: int, m: int, Dv: int, like: torch.Tensor) -> "ScanState":
        return ScanState(like.new_zeros(B, Hk, 1, m, Dv), like.new_zeros(B, Hk, 1, m), like.new_zeros(B, Hk, 1, Dv),
                         like.new_zeros(B, 1, 1, 1), like.new_full((B, Hk, 1, 1), float("-inf")))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map, projection: torch.Tensor | None,
                     causal: bool = False, key_padding_mask: torch.Tensor | None = None, *,
                     chunk: int, q_offset: int = 0) -> torch.Tensor:
    """Linear attention. q `[B, H, N_q, D]`, k `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv dividing H),
    projection `[m, D]` (None for elu1), `key_padding_mask` bool `[B, N_k]` (True = ignored key). Returns
    `[B, H, N_q, D_v]` in q's dtype. Causal: query row r at position t = q_offset + r sees keys j <= t, by
    prefix sums over chunks of `chunk` keys.
    """
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    w = projection.to(work) if projection is not None else None
    B, H, n_q, _ = q.shape
    valid = valid_keys(k, key_padding_mask)
    if causal:
        k, v, valid = align_keys(q_offset + n_q, k, v, valid)
    k, v = (torch.where(valid[:, None, :, None], x, 0.0) for x in (k, v))
    qg, kg, vg = grouped(q, k), k[:, :, None], v[:, :, None]
    if causal:
        o = q_offset
        state = absorb(None, kg[..., :o, :], vg[..., :o, :], valid[:, :o], feature_map, w) if o else None
        out = causal_scan(qg, kg[..., o:, :], vg[..., o:, :], valid[:, o:], feature_map, w, chunk, state)[0]
    else:
        out = _bidirectional(qg, kg, vg, valid, feature_map, w)
    return out.reshape(B, H, n_q, v.shape[-1]).to(dtype)


def grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q `[B, H, N, D]` as `[B, H_kv, G, N, D]` (query head h = kv head h // G, member h % G)."""
    B, H, N, D = q.shape
    return q.reshape(B, k.shape[1], H // k.shape[1], N, D)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a [B, Hk, G, x, y] @ b [B, Hk, 1, y, z]` with the group folded into rows (b is never repeated)."""
    B, Hk, G, x, y = a.shape
    return torch.matmul(a.reshape(B, Hk, G * x, y), b[:, :, 0]).view(B, Hk, G, x, b.shape[-1])


def _bidirectional(q, k, v, valid, fm, w) -> torch.Tensor:
    fq = query_features(q, fm, w)
    fk = key_features(k[:, :, 0], fm, w, valid)[:, :, None]
    kv = torch.matmul(fk.transpose(-1, -2), v)                         # [B, Hk, 1, m, Dv]
    return ratio(_mm(fq, kv), _mm(fq, fk.sum(-2)[..., None])[..., 0])


def _key_terms(k, valid, fm, w, r_prev):
    """(kf, r, e): key features at time t are `kf_j exp(r_j - r_t) + e` (for unpadded j), `r` the running
    max of the keys' projections continuing `r_prev` (`[B, Hk, 1, 1]`, -inf: no key before)."""
    ok = valid[:, None, None, :, None]
    if not isinstance(fm, Favor):
        r = torch.zeros(k.shape[:4], dtype=k.dtype, device=k.device)
        return key_features(k[:, :, 0], fm, w, valid)[:, :, None], r, 0.0
    m = w.shape[0]
    u, a = favor_exponent(k, w)
    r = u.masked_fill(~ok, float("-inf")).amax(-1).cummax(dim=-1).values     # [B, Hk, 1, n] running max
    if r_prev is not None:
        r = torch.maximum(r, r_prev[..., 0:1].expand_as(r))
    seen = torch.isfinite(r)
    first = torch.where(seen, r, torch.full_like(r, float("inf"))).amin(-1, keepdim=True)
    first = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    r = torch.where(seen, r, first)                  # before the first key: any value <= later r (no effect)
    kf = m ** -0.5 * torch.exp((a - r[..., None]).masked_fill(~ok, float("-inf")))
    return kf, r, m ** -0.5 * fm.eps


def _query_terms(q, fm, w):
    """(qf, qsum): query features and their sums (the eps part multiplies qsum)."""
    qf = favor_features(q, w, True, fm.eps) if isinstance(fm, Favor) else query_features(q, fm, w)
    return qf, qf.sum(-1)


def _absorb_terms(st: ScanState, kc, vc, rc, wc) -> ScanState:
    """The state with the keys of one chunk added (kf, r from `_key_terms`; wc the 0/1 validity)."""
    r_new = rc[..., -1:]
    ks = kc * torch.exp(rc - r_new)[..., None]
    back = torch.exp(st.r_ref - r_new)                                    # 0 before any key
    S = back[..., None] * st.S + torch.matmul(ks.transpose(-1, -2), vc)
    z = back * st.z + ks.sum(-2)
    return ScanState(S, z, st.sv + (vc * wc).sum(-2), st.cnt + wc.sum((-1, -2))[..., None], r_new)


def absorb(state, k, v, valid, fm, w) -> ScanState:
    """`state` (None: empty) with keys k `[B, Hk, 1, n, D]`, v `[B, Hk, 1, n, Dv]` added; valid `[B, n]`."""
    B, Hk = k.shape[:2]
    kf, r, _ = _key_terms(k, valid, fm, w, None if state is None else state.r_ref)
    if state is None:
        state = ScanState.empty(B, Hk, kf.shape[-1], v.shape[-1], v)
    if k.shape[-2] == 0:
        return state
    return _absorb_terms(state, kf, v, r, valid[:, None, None, :, None].to(v.dtype))


def read(state: ScanState, q, fm, w) -> torch.Tensor:
    """Rows `[B, Hk, G, n, Dv]` of queries q `[B, Hk, G, n, D]` that see every key of `state`."""
    qf, qsum = _query_terms(q, fm, w)
    e = eps_part(fm, w)
    num = _mm(qf, state.S) + e * qsum[..., None] * state.sv[:, :, :, None]      # S, z are at the last r
    den = _mm(qf, state.z[..., None])[..., 0] + e * qsum * state.cnt
    return ratio(num, den)


def eps_part(fm, w) -> float:
    """The non-decaying feature term `m^-1/2 eps` of FAVOR+ (0 for the other maps)."""
    return w.shape[0] ** -0.5 * fm.eps if isinstance(fm, Favor) else 0.0


def causal_scan(q, k, v, valid, fm, w, chunk: int, state: ScanState | None = None):
    """(rows `[B, Hk, G, n, Dv]`, state after the keys): row t sees the keys of `state` and keys 0 .. t here.
    q `[B, Hk, G, n, D]`, k `[B, Hk, 1, n, D]`, v `[B, Hk, 1, n, Dv]` (padded keys zero), valid `[B, n]`."""
    B, Hk, G, N, _ = q.shape
    qf, qsum = _query_terms(q, fm, w)
    kf, r, e = _key_terms(k, valid, fm, w, None if state is None else state.r_ref)
    st = ScanState.empty(B, Hk, kf.shape[-1], v.shape[-1], v) if state is None else state
    wv = valid[:, None, None, :, None].to(v.dtype)
    outs = []
    for s in range(0, N, chunk):
        t = slice(s, min(s + chunk, N))
        qc, kc, vc, rc, wc = qf[..., t, :], kf[..., t, :], v[..., t, :], r[..., t], wv[..., t, :]
        n = qc.shape[-2]
        tri = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        decay = torch.exp((rc[..., None, :] - rc[..., :, None]).masked_fill(~tri, float("-inf")))  # [t, j]
        g = _mm(qc, kc.transpose(-1, -2)) * decay                            # exp part, [B, Hk, G, t, j]
        g = g + e * qsum[..., t, None] * (wc[..., 0][..., None, :] * tri)    # eps part of unpadded j <= t
        back = torch.exp(st.r_ref - rc)[..., None]                           # rescale the state, <= 1
        num = _mm(g, vc) + back * _mm(qc, st.S) + e * qsum[..., t, None] * st.sv[:, :, :, None]
        den = (g.sum(-1) + back[..., 0] * _mm(qc, st.z[..., None])[..., 0]
               + e * qsum[..., t] * st.cnt)
        outs.append(ratio(num, den))
        st = _absorb_terms(st, kc, vc, rc, wc)
    out = torch.cat(outs, dim=-2) if outs else q.new_zeros(B, Hk, G, 0, v.shape[-1])
    return out, st
