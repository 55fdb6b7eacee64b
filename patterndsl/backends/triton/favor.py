"""Linear attention (FAVOR+, relu features, elu+1) on the fused Triton kernels, as a custom op with autograd.

The feature map never materialises `[B, H, N, m]`: the kernels compute features per chunk and feature block
(favor_fwd.py, favor_bwd.py), over segments of the sequence that run in parallel (scan.py). FAVOR+ stabilisers
are the per-query max over features of `x' W^T` and, for keys, one max over all valid keys (non-causal) or its
running max over keys `j <= t` (causal: no query sees a future key); they are constants for the gradient, as in
performer-pytorch. Causal calls index positions: query row `r` sits at `q_offset + r` and sees keys `j <=
q_offset + r` (keys past the last query are never read; a query past the last key sees them all).

Decoding one token at a time would keep, per (batch, head, feature block), the state the walk kernels start
from: `S = sum_j exp(ck_j - c) P_j^T v_j` `[m, D_v]`, `z = sum_j exp(ck_j - c) P_j` `[m]`, the sum of valid
values and their count, and the running max `c`; `favor_fwd_kernel` walks a segment from exactly such a state.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...errors import PatternError
from ...ir.program import Elu1, Favor, ReluFeatures
from ..custom import register_backward
from .favor_bwd import favor_bwd, reverse_states
from .favor_fwd import ELU1, FAVOR, RELU, eps_values, favor_fwd, favor_stats, key_states, meta
from .offsets import QueryOffsets, offset_values
from .scan import boundaries, prefix, segments, suffix
from .softmax import check_dtypes
from .target import target

RELU_EPS = 1e-3


def _scale_x(kind: int, d: int) -> float:
    return 1.0 if kind == ELU1 else d ** -0.25


class Stabilisers(NamedTuple):
    """FAVOR+ maxima (float32): `cq [B, H, N_q]` per query, `ck` for the keys (`[B, H, N_k]`, one value, when
    not causal; the running max at each position `[B, H, P]` when causal); `q_arg`/`k_arg` the arg-max feature
    per token, `j_star` the key holding `ck` (`[B, H, 1]`, or `[B, H, P]` when causal)."""
    cq: Tensor
    ck: Tensor
    q_arg: Tensor | None = None
    k_arg: Tensor | None = None
    j_star: Tensor | None = None


def stabilisers(q, k, w, key_padding_mask, kind: int, causal: bool, P: int) -> Stabilisers:
    """The stabilisers of FAVOR+ (padded keys excluded); zeros for the other feature maps."""
    n_c = P if causal else k.shape[2]
    if kind != FAVOR:
        return Stabilisers(q.new_zeros(q.shape[:3], dtype=torch.float32),
                           k.new_zeros(*k.shape[:2], n_c, dtype=torch.float32))
    sx = _scale_x(kind, q.shape[3])
    (cq, q_arg), (mk, k_arg) = favor_stats(q, w, sx), favor_stats(k, w, sx)
    if key_padding_mask is not None:
        mk = mk.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    if causal:
        ck, j_star = torch.cummax(mk[..., :P], dim=-1)
        seen = torch.isfinite(ck)
        # before the first valid key the stabiliser only scales zero contributions: any finite value that
        # keeps it non-decreasing will do
        first = ck.gather(-1, seen.to(torch.int8).argmax(-1, keepdim=True))
        ck = torch.where(seen, ck, torch.where(torch.isfinite(first), first, 0.0))
        if ck.shape[-1] < P:                 # positions past the last key: its running max
            more = P - ck.shape[-1]
            ck, j_star = torch.cat([ck, ck[..., -1:].expand(*ck.shape[:2], more)], -1), \
                torch.cat([j_star, j_star[..., -1:].expand(*ck.shape[:2], more)], -1)
    else:
        c, j_star = mk.max(-1, keepdim=True)
        ck = torch.where(torch.isfinite(c), c, 0.0).expand_as(mk)
    return Stabilisers(cq.contiguous(), ck.contiguous(), q_arg, k_arg, j_star)


class _Scan:
    """What the forward and backward of one call share: sizes, segments, stabilisers, launch options."""

    def __init__(self, q, k, v, w, key_padding_mask, kind: int, causal: bool, eps: float, q_offset, segment: int):
        self.q, self.k, self.v, self.w = q, k, v, w
        self.kpm_bool = key_padding_mask
        self.kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None
        self.kind, self.causal, self.eps = kind, causal, eps
        B, H, NQ, D = q.shape
        self.sx = _scale_x(kind, D)
        self.offsets = QueryOffsets(tuple(q_offset), str(q.device)) if causal else QueryOffsets(())
        self.P = self.offsets.extent(NQ)                       # the queries' domain: positions or rows
        self.opts = meta(q, k, v, w, kind, causal, key_padding_mask)
        self.stab = stabilisers(q, k, w, key_padding_mask, kind, causal, self.P)
        nf = -(-w.shape[0] // self.opts["BLOCK_F"])
        sms, bt = target(q.device).sms, self.opts["BLOCK_T"]
        self.seg_q, self.n_q = segments(self.P, bt, B * H * nf, sms, segment or None)
        self.seg_k, self.n_k = (self.seg_q, self.n_q) if causal else segments(k.shape[2], bt, B * H * nf, sms,
                                                                              segment or None)

    def _c(self) -> Tensor:
        return self.stab.ck.reshape(-1, self.stab.ck.shape[-1])

    def states(self):
        """(per-chunk states or None, the key states entering each segment (causal) or in total, references)."""
        P = self.P if self.causal else self.k.shape[2]
        eps_r = eps_values(self.kind, self.eps)[1]
        chunks, (S, Z, VS, NS) = key_states(self.k, self.v, self.w, self.stab.ck, self.kpm, P, self.seg_k, self.n_k,
                                            self.sx, eps_r, self.opts)
        if not self.causal:
            return None, tuple(x.sum(0, keepdim=True) for x in (S, Z, VS, NS)), self.stab.cq
        c = self._c()
        c_end = boundaries(c, self.seg_k, self.n_k, last=True)
        (S, c_prev), (Z, _) = prefix(S, c_end, c[:, 0]), prefix(Z, c_end, c[:, 0])
        return chunks, (S, Z, prefix(VS), prefix(NS)), c_prev

    def forward(self):
        chunks, states, c_prev = self.states()
        return favor_fwd(self.q, self.k, self.v, self.w, self.stab.cq, self.stab.ck, self.kpm, chunks, states, c_prev,
                         self.offsets, self.P, self.seg_q, self.kind, self.eps, self.sx, self.opts)

    def backward(self, dout, out, den):
        DV, bdv = self.v.shape[3], self.opts["BLOCK_DV"]
        safe = torch.where(den > 0, den, 1.0)
        g = torch.where((den > 0)[..., None], dout.float() / safe[..., None], 0.0)
        gd = torch.where(den > 0, -(dout.float() * out.float()).sum(-1) / safe, 0.0).contiguous()
        gn = torch.nn.functional.pad(g, (0, bdv - DV)).contiguous()
        chunks, states, c_prev = self.states()
        eps_q = eps_values(self.kind, self.eps)[0]
        rchunks, (R, RR, SG) = reverse_states(self.q, self.w, self.stab.cq, self.stab.ck, gn, gd, self.offsets,
                                              self.P, self.seg_q, self.n_q, self.sx, eps_q, self.opts)
        if self.causal:
            c = self._c()
            c_start = boundaries(c, self.seg_q, self.n_q, last=False)
            (R, c_ref), (RR, _) = suffix(R, c_start, c[:, -1]), suffix(RR, c_start, c[:, -1])
            SG = suffix(SG)
        else:
            R, RR, SG, c_ref = R.sum(0, keepdim=True), RR.sum(0, keepdim=True), SG.sum(0, keepdim=True), gd
        dq, dk, dv, sphi, rsq = favor_bwd(self.q, self.k, self.v, self.w, self.stab.cq, self.stab.ck, self.kpm, gn,
                                          gd, chunks, states, c_prev, rchunks, (R, RR, SG), c_ref, self.offsets,
                                          self.P, self.seg_q, self.kind, self.eps, self.sx, self.opts)
        if self.kind == FAVOR:
            self._stabiliser_grads(dq, dk, g, gd, sphi, rsq)
        return dq, dk, dv

    def _stabiliser_grads(self, dq, dk, g, gd, sphi, rsq) -> None:
        """Add, in place, the gradients that flow through the FAVOR+ maxima to the arg-max feature of each.

        Query t: `d cq_t = -sum_f dL/du_tf` (from the kernel). Keys: since `sum_j w_tj G_tj = 0`, only the eps
        term moves: `d ck_t = eps * sum_f phi_q(t) * sum_{valid j (<= t)} G_tj`; it reaches the key that holds
        the max (the running max's arg-max at the query's position when causal)."""
        stab, v = self.stab, self.v
        ws = self.w.float() * self.sx
        dq += rsq.neg()[..., None] * ws[stab.q_arg]
        B, H, NK, D = dk.shape
        valid = torch.ones(B, NK, dtype=torch.bool, device=v.device) if self.kpm is None else ~self.kpm_bool
        vv = v.float() * valid[:, None, :, None]
        cnt = valid[:, None, :].float()
        if self.causal:
            pos = self._positions()                                              # [B, N_q]
            at = pos.clamp(max=NK - 1)[:, None, :].expand(B, H, -1)
            sg = (g * vv.cumsum(2).gather(2, at[..., None].expand(-1, -1, -1, vv.shape[3]))).sum(-1) + \
                gd * cnt.cumsum(-1).expand(B, H, NK).gather(2, at)
            j = stab.j_star.gather(2, pos[:, None, :].expand(B, H, -1))
            dr = self.eps * sphi * sg
        else:
            sg = (g * vv.sum(2, keepdim=True)).sum(-1) + gd * cnt.sum(-1, keepdim=True)
            dr = (self.eps * sphi * sg).sum(-1, keepdim=True)
            j = stab.j_star
        feat = torch.gather(stab.k_arg, 2, j)                                   # arg-max feature of that key
        add = dr[..., None] * ws[feat]                                          # [B, H, N, D]
        dk.view(B * H, NK, D).scatter_add_(1, j.reshape(B * H, -1, 1).expand(-1, -1, D), add.reshape(B * H, -1, D))

    def _positions(self) -> Tensor:
        NQ, dev = self.q.shape[2], self.q.device
        rows = torch.arange(NQ, device=dev)
        if self.offsets.per_row:
            return self.offsets.tensor(None).long()[:, None] + rows
        return (rows + self.offsets.scalar).expand(self.q.shape[0], NQ)


# ------------------------------------------------------------------------------------------- custom ops
def forward_body(q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor], kind: int,
                 causal: bool, eps: float, q_offset: list[int], segment: int) -> tuple[Tensor, Tensor]:
    """The forward custom op's body: (out, den)."""
    q, k, v, w = q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    return _Scan(q, k, v, w, key_padding_mask, kind, causal, eps, q_offset, segment).forward()


def backward_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor],
                  out: Tensor, den: Tensor, kind: int, causal: bool, eps: float, q_offset: list[int],
                  segment: int) -> tuple[Tensor, Tensor, Tensor]:
    """The backward custom op's body: (dq, dk, dv), contiguous."""
    q, k, v, w = q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous()
    scan = _Scan(q, k, v, w, key_padding_mask, kind, causal, eps, q_offset, segment)   # recomputed, not saved
    dq, dk, dv = scan.backward(dout.contiguous(), out, den)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_linear_op = torch.library.custom_op("patterndsl::triton_linear", forward_body, mutates_args=())
_linear_bwd_op = torch.library.custom_op("patterndsl::triton_linear_bwd", backward_body, mutates_args=())


@_linear_op.register_fake
def _(q, k, v, w, key_padding_mask, kind, causal, eps, q_offset, segment):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[3]), q.new_empty(B, H, N, dtype=torch.float32)


@_linear_bwd_op.register_fake
def _(dout, q, k, v, w, key_padding_mask, out, den, kind, causal, eps, q_offset, segment):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)   # contiguous, like the kernels'


register_backward(_linear_op, _linear_bwd_op, lambda d, x, o: (d[0], *x[:5], *o, *x[5:]))


# ------------------------------------------------------------------------------------------------ public
def _feature_map(feature_map, q):
    if isinstance(feature_map, Favor):
        return FAVOR, float(feature_map.eps), None
    if isinstance(feature_map, ReluFeatures):
        return RELU, RELU_EPS, None
    if isinstance(feature_map, Elu1):
        return ELU1, 0.0, torch.eye(q.shape[3], dtype=q.dtype, device=q.device)
    raise PatternError(f"no Triton kernel for the feature map {type(feature_map).__name__}")


def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map, projection: Tensor | None, causal: bool = False,
                     key_padding_mask: Tensor | None = None, q_offset=None, segment: int | None = None) -> Tensor:
    """`phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)` with the feature map fused in (differentiable in q, k, v).

    q `[B, H, N_q, D]`, k `[B, H, N_k, D]`, v `[B, H, N_k, D_v]` (float16, bfloat16 or float32; float64 is
    refused); `feature_map` a `Favor`, `ReluFeatures` or `Elu1`; `projection` `[m, D]` (None for Elu1; not
    trained); `causal` sums keys `j <= t` only, with query row r at position `t = q_offset + r` (`q_offset`: int
    or integer tensor `[B]`, default 0; a key past the last query is never seen, a query past the last key sees
    every key); `key_padding_mask` bool `[B, N_k]` (True = ignored key). Rows with no valid key output zeros.
    `segment` (tokens per parallel segment, a multiple of the chunk) overrides the choice that fills the GPU.
    Returns `[B, H, N_q, D_v]`.
    """
    kind, eps, eye = _feature_map(feature_map, q)
    projection = eye if eye is not None else projection
    check_dtypes("linear attention", q, k, v)
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or v.shape[:3] != k.shape[:3]:
        raise PatternError(f"linear attention needs k like q [B, H, N_k, D] and v [B, H, N_k, D_v]: "
                           f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if projection is None or projection.dim() != 2 or projection.shape[1] != q.shape[3]:
        got = "None" if projection is None else str(list(projection.shape))
        raise PatternError(f"projection must be a tensor [m, {q.shape[3]}] (features, head_dim), got {got}")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 16
                                or segment & 15):
        raise PatternError(f"segment must be a multiple of 16 tokens, got {segment!r}")
    offsets = list(offset_values(q_offset, q.shape[0])) or [0]
    w = projection.detach().to(q.dtype)
    return _linear_op(q, k, v, w, key_padding_mask, kind, bool(causal), eps, offsets, segment or 0)[0]
