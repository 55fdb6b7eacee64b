"""Softmax stages over sequence-sharded tensors: halo exchange, local block-sparse calls, global rows split.

`sharded_softmax` (queries and keys sharded alike) runs a `HaloPlan` (`halo.py`): it sends each rank the key
ranges it needs (one batched point-to-point exchange of K|V, and of the padding flags), calls the torch
backend's `softmax_attention` once per key buffer with a `Region` mask (absolute positions), merges the
buffers of a segment by log-sum-exp, and replaces the global rows by their split computation: every rank
computes them against its own keys, the parts are all-gathered and merged. The backward is the reverse: the
owners of global rows share their output gradient, and the key gradients computed for received keys go back
to their owners, which add them to their own.

`split_softmax` (replicated queries, sharded keys: Luna's pack) is the global-row path alone, for every row;
`local_softmax` (sharded queries, replicated keys: Luna's unpack) needs no communication.
"""
from __future__ import annotations

import torch

from ..backends.torch.softmax import softmax_attention
from .comm import Comm, merge, merge_pieces
from .halo import HaloPlan
from .links import grads
from .region import Region


def _call(q, k, v, mask, scale, kpm, runtime=None):
    """(out, lse) of one local call; no query or no key: zeros and -inf."""
    if q.shape[2] == 0 or k.shape[2] == 0:
        return merge_pieces([], q, v.shape[3])
    return softmax_attention(q, k, v, mask, scale=scale, key_padding_mask=kpm, runtime=runtime, return_lse=True)


def _ids(runtime, rows: tuple[int, int], keys: tuple[int, int]):
    """The runtime ids (name -> `[B, N]` of the whole sequence) of a local call: (query ids, key ids)."""
    return {k: (ids[:, rows[0]:rows[1]], ids[:, keys[0]:keys[1]]) for k, ids in runtime.items()} if runtime else None


def _runs(rows: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Consecutive runs of sorted rows: (first row, stop, index of the first in `rows`)."""
    out: list[list[int]] = []
    for x, r in enumerate(rows):
        if out and r == out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([r, r + 1, x])
    return [tuple(o) for o in out]


def _against_own_keys(mask, sh, rank, q_rows, rows, k, v, kpm, scale, n_q, runtime=None):
    """(out, lse) of query rows `q_rows` (at absolute `rows`, sorted) against this rank's own keys only."""
    parts = []
    for g0, g1, x in _runs(rows):
        qs = q_rows[:, :, x:x + g1 - g0]
        segs = [_call(qs, k[:, :, o:o + e - a], v[:, :, o:o + e - a], Region(mask, g0, a, n_q, sh.seq_len), scale,
                      None if kpm is None else kpm[:, o:o + e - a], _ids(runtime, (g0, g1), (a, e)))
                for (a, e), o in zip(sh.segments[rank], sh.offsets(rank)) if e > a]
        parts.append(merge_pieces(segs, qs, v.shape[3]))
    if not parts:
        return merge_pieces([], q_rows, v.shape[3])
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


# ------------------------------------------------------------------------------------------ halo exchange
def _slices(x: torch.Tensor, sh, ranges, dim: int) -> torch.Tensor:
    """The rows of absolute ranges `ranges` (each inside one of this rank's segments) of local tensor x."""
    return torch.cat([x.narrow(dim, sh.local_index(a), b - a) for a, b in ranges], dim)


def _exchange(comm: Comm, plan: HaloPlan, x: torch.Tensor, dim: int = 2) -> dict[int, torch.Tensor]:
    """Send every other rank the ranges of local x it needs; receive the ranges this rank needs."""
    sh, rank = plan.sharding, comm.rank
    sends = {dst: _slices(x, sh, ranges, dim) for dst, ranges in plan.sends(rank).items()}
    recvs = {}
    for src, ranges in plan.recvs(rank).items():
        shape = list(x.shape)
        shape[dim] = sum(b - a for a, b in ranges)
        recvs[src] = (tuple(shape), x.dtype, x.device)
    return comm.exchange(sends, recvs, x.device)


def _return(comm: Comm, plan: HaloPlan, back: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The reverse exchange: send each source the gradients of what it sent; add what comes back into a
    gradient of the local tensor `like`."""
    sh, rank = plan.sharding, comm.rank
    recvs = {}
    for dst, ranges in plan.sends(rank).items():
        recvs[dst] = ((*like.shape[:2], sum(b - a for a, b in ranges), like.shape[3]), like.dtype, like.device)
    got = comm.exchange(back, recvs, like.device)
    out = torch.zeros_like(like)
    for dst, ranges in plan.sends(rank).items():
        index = torch.cat([torch.arange(sh.local_index(a), sh.local_index(a) + b - a) for a, b in ranges])
        out.index_add_(2, index.to(like.device), got[dst])
    return out


def _buffer(plan: HaloPlan, rank: int, buf, local, received, offsets):
    """A buffer's rows from the local tensor and the received ones (zeros in its gaps); dim 2 for K|V, 1 for
    padding flags (True in the gaps)."""
    sh = plan.sharding
    dim = 2 if local.dim() == 4 else 1
    parts, at = [], buf.lo
    for owner, a, b in buf.pieces:
        if a > at:
            shape = list(local.shape)
            shape[dim] = a - at
            parts.append(local.new_ones(shape) if dim == 1 else local.new_zeros(shape))
        if owner == rank:
            parts.append(local.narrow(dim, sh.local_index(a), b - a))
        else:
            parts.append(received[owner].narrow(dim, offsets[owner](a), b - a))
        at = b
    return torch.cat(parts, dim)


def _offsets(plan: HaloPlan, rank: int) -> dict:
    """Per source: a function from an absolute position to its row in that source's message."""
    out = {}
    for src, ranges in plan.recvs(rank).items():
        starts, at = [], 0
        for a, b in ranges:
            starts.append((a, b, at))
            at += b - a
        out[src] = lambda x, s=starts: next(o + x - a for a, b, o in s if a <= x < b)
    return out


# ----------------------------------------------------------------------------------- global rows, split
class _Graph:
    """What a forward keeps for its backward: the local autograd graph's leaves and outputs."""


def _split(comm: Comm, sh, mask, q_rep, rows, k, v, kpm, scale, n_q, g: _Graph, runtime=None):
    """Rows `rows` (absolute, sorted) of replicated queries `q_rep`, split over the ranks' keys: this rank's part
    against its own keys, all-gathered and merged by log-sum-exp (the same merged rows on every rank)."""
    o, lse = _against_own_keys(mask, sh, comm.rank, q_rep, rows, k, v, kpm, scale, n_q, runtime)
    g.part = torch.cat([o.to(lse.dtype), lse[..., None]], -1)
    g.gathered = comm.all_gather(g.part).requires_grad_(g.on)
    g.merged = merge(g.gathered[..., :-1], g.gathered[..., -1], 0)[0]
    return g.merged.to(q_rep.dtype)


def _split_backward(comm: Comm, g: _Graph, dmerged):
    """The gradient of this rank's part, from every rank's gradient of the merged rows."""
    total = comm.all_reduce(dmerged.to(g.merged.dtype) if dmerged is not None else torch.zeros_like(g.merged))
    return torch.autograd.grad(g.merged, g.gathered, total.to(g.merged.dtype))[0][comm.rank]


def _leaf(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x.detach().requires_grad_(on)


# ------------------------------------------------------------------------------------- sharded x sharded
def _sharded_forward(comm: Comm, plan: HaloPlan, q, k, v, kpm, scale, on: bool, runtime=None):
    rank, sh, n = comm.rank, plan.sharding, plan.sharding.seq_len
    D, Dv = q.shape[3], v.shape[3]
    g = _Graph()
    g.on = on
    received = _exchange(comm, plan, torch.cat([k, v], -1).detach())
    pads = ({s: t.bool() for s, t in _exchange(comm, plan, kpm.to(torch.uint8), dim=1).items()}
            if kpm is not None else None)
    with torch.set_grad_enabled(on):
        g.q, g.kv = _leaf(q, on), _leaf(torch.cat([k, v], -1), on)
        g.received = {s: _leaf(t, on) for s, t in received.items()}
        offsets = _offsets(plan, rank)
        outs = []
        for s, ((a, e), o) in enumerate(zip(sh.segments[rank], sh.offsets(rank))):
            qs, pieces = g.q[:, :, o:o + e - a], []
            for buf in (b for b in plan.buffers[rank] if b.seg == s):
                kvb = _buffer(plan, rank, buf, g.kv, g.received, offsets)
                pad = _buffer(plan, rank, buf, kpm, pads, offsets) if kpm is not None else None
                pieces.append(_call(qs, kvb[..., :D], kvb[..., D:], Region(plan.rest, a, buf.lo, n, n), scale, pad,
                                    _ids(runtime, (a, e), (buf.lo, buf.hi))))
            outs.append(merge_pieces(pieces, qs, Dv)[0])
        out = torch.cat(outs, 2) if outs else q.new_zeros(*q.shape[:3], Dv)
        if plan.rows:
            g.own = [(x, sh.local_index(r)) for x, r in enumerate(plan.rows) if sh.owner(r) == rank]
            xs, ls = [x for x, _ in g.own], [loc for _, loc in g.own]
            q_rows = q.new_zeros(*q.shape[:2], len(plan.rows), D)
            q_rows[:, :, xs] = q.detach()[:, :, ls]
            g.q_rows = comm.all_reduce(q_rows).requires_grad_(on)
            rows = _split(comm, sh, plan.mask, g.q_rows, plan.rows, g.kv[..., :D], g.kv[..., D:], kpm, scale, n, g,
                          runtime)
            if g.own:
                out = out.index_copy(2, torch.tensor(ls, device=q.device), rows[:, :, xs])
    g.out = out
    return out, g


class _ShardedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, comm, plan, scale, runtime):
        comm.phase = "forward"
        out, ctx.g = _sharded_forward(comm, plan, q, k, v, kpm, scale, True, runtime)
        ctx.comm, ctx.plan, ctx.d = comm, plan, q.shape[3]
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        comm, plan, g = ctx.comm, ctx.plan, ctx.g
        comm.phase = "backward"
        outs, douts = [g.out], [dout]
        inputs = [g.q, g.kv, *g.received.values()]
        if plan.rows:
            dmerged = grads([g.out], [g.merged], [dout])[0]
            outs, douts, inputs = outs + [g.part], douts + [_split_backward(comm, g, dmerged)], inputs + [g.q_rows]
        got = grads(outs, inputs, douts)
        dq, dkv = got[0], got[1]
        if plan.rows:
            drows = comm.all_reduce(got[-1])
            for x, loc in g.own:
                dq[:, :, loc] += drows[:, :, x]
        back = dict(zip(g.received, got[2:2 + len(g.received)]))
        dkv = dkv + _return(comm, plan, back, g.kv)
        ctx.g = None
        return dq, dkv[..., :ctx.d], dkv[..., ctx.d:], None, None, None, None, None


def sharded_softmax(comm: Comm, plan: HaloPlan, q, k, v, kpm, scale: float, runtime=None) -> torch.Tensor:
    """Softmax attention of this rank's query rows over the whole (sharded) sequence; returns its rows.
    `runtime`: the ids of `same(...)` masks, name -> `[B, N]` for the whole sequence."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _ShardedSoftmax.apply(q, k, v, kpm, comm, plan, scale, runtime)
    comm.phase = "forward"
    with torch.no_grad():
        return _sharded_forward(comm, plan, q, k, v, kpm, scale, False, runtime)[0]


# ------------------------------------------------------------------------------ replicated queries or keys
class _SplitSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, comm, sh, mask, scale):
        comm.phase = "forward"
        g = _Graph()
        g.on = True
        with torch.enable_grad():
            g.q, g.k, g.v = _leaf(q, True), _leaf(k, True), _leaf(v, True)
            out = _split(comm, sh, mask, g.q, tuple(range(q.shape[2])), g.k, g.v, kpm, scale, q.shape[2], g)
        ctx.g, ctx.comm = g, comm
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        g, comm = ctx.g, ctx.comm
        comm.phase = "backward"
        dpart = _split_backward(comm, g, dout)
        dq, dk, dv = grads([g.part], [g.q, g.k, g.v], [dpart])
        ctx.g = None
        return dq, dk, dv, None, None, None, None, None


def split_softmax(comm: Comm, sh, mask, q, k, v, kpm, scale: float) -> torch.Tensor:
    """Replicated queries (every rank holds all of them) over sharded keys: replicated output. The gradient of
    q on each rank is its part; their sum over ranks is q's gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _SplitSoftmax.apply(q, k, v, kpm, comm, sh, mask, scale)
    comm.phase = "forward"
    g = _Graph()
    g.on = False
    with torch.no_grad():
        return _split(comm, sh, mask, q, tuple(range(q.shape[2])), k, v, kpm, scale, q.shape[2], g)


def local_softmax(sh, rank: int, mask, q, k, v, scale: float) -> torch.Tensor:
    """Sharded queries over replicated keys (all of them on every rank): no communication."""
    outs = [_call(q[:, :, o:o + e - a], k, v, Region(mask, a, 0, sh.seq_len, k.shape[2]), scale, None)[0]
            for (a, e), o in zip(sh.segments[rank], sh.offsets(rank))]
    return torch.cat(outs, 2) if outs else q.new_zeros(*q.shape[:3], v.shape[3])
