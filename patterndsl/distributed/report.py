"""What a sharded run costs each rank: tokens, work, keys exchanged and bytes sent, against ring attention.

The bytes are predicted from the plans exactly as `comm.py` counts them when the run happens (a test checks
prediction against measurement): point-to-point payloads, collectives as ring algorithms send them. Ring
attention passes every K/V shard around the ring: in the forward rank r sends every block but its
successor's (`N - n_{r+1}` keys of K and V), in the backward the K/V blocks again plus their dK/dV.

>>> import patterndsl as pd
>>> r = distributed_report(pd.compile("longformer", window=512), 65536, 4, head_dim=64)
>>> [round(x, 3) for x in r.fraction_of_ring()]
[0.007, 0.01, 0.01, 0.005]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir import mask as M
from ..ir.program import INPUT, Favor, Linear, Nested, Softmax
from .balance import _share, choose, position_costs, rank_work, stage_kinds
from .halo import halo_plan


@dataclass(frozen=True)
class Report:
    """Per rank: tokens, work (pairs or feature products per head), keys received and sent (sharded softmax
    stages), bytes sent forward and backward, and ring attention's bytes."""
    pattern: str
    sharding: object
    shape: str
    tokens: tuple[int, ...]
    work: tuple[float, ...]
    keys_in: tuple[int, ...]
    keys_out: tuple[int, ...]
    forward: tuple[int, ...]
    backward: tuple[int, ...]
    ring_forward: tuple[int, ...]
    ring_backward: tuple[int, ...]

    def fraction_of_ring(self) -> list[float]:
        """Forward bytes per rank as a fraction of ring attention's."""
        return [f / r if r else 0.0 for f, r in zip(self.forward, self.ring_forward)]

    def __str__(self) -> str:
        mean = sum(self.work) / max(len(self.work), 1)
        lines = [f"context parallel: {self.pattern}, {self.sharding}",
                 f"  {self.shape}; busiest rank does {max(self.work) / mean if mean else 1:.2f}x the mean work",
                 "  rank   tokens   work/head   keys in  keys out   fwd bytes   bwd bytes  ring fwd  ring bwd"
                 "  fwd/ring"]
        for r in range(len(self.tokens)):
            ring = self.ring_forward[r]
            lines.append(f"  {r:>4} {self.tokens[r]:>8} {self.work[r]:>11.3g} {self.keys_in[r]:>9} "
                         f"{self.keys_out[r]:>9} {_size(self.forward[r]):>11} {_size(self.backward[r]):>11} "
                         f"{_size(ring):>9} {_size(self.ring_backward[r]):>9} "
                         f"{self.forward[r] / ring if ring else 0:>9.1%}")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class _Bytes:
    """Bytes per rank and phase, counted as `comm.Comm` counts them."""

    def __init__(self, w: int):
        self.w, self.fwd, self.bwd = w, [0] * w, [0] * w

    def reduce(self, phase, elems, size, ranks=None):
        for r in range(self.w) if ranks is None else ranks:
            if self.w > 1 and elems:
                getattr(self, phase)[r] += int(2 * (self.w - 1) / self.w * elems * size)

    def gather(self, phase, elems, size):
        for r in range(self.w):
            if self.w > 1 and elems:
                getattr(self, phase)[r] += (self.w - 1) * elems * size


def distributed_report(op, seq_len: int, world_size: int, sharding="auto", batch: int = 1, heads: int | None = None,
                       head_dim: int = 64, dtype=torch.float32, padding: bool = False,
                       runtime: dict | None = None, kv_heads: int | None = None) -> Report:
    """The `Report` of running `op` at `seq_len` over `world_size` ranks (no process group needed). `runtime`
    gives the ids of `same(...)` masks (name -> `[B, N]`); without them such masks are planned as if every
    pair might be allowed (an upper bound). `kv_heads`: k and v's heads (grouped-query attention; default
    `heads`)."""
    sh = choose(op, seq_len, world_size, sharding)
    heads = heads or op.ir.num_heads or 1
    kv_heads = kv_heads or heads
    e = torch.empty(0, dtype=dtype).element_size()
    work_e = 4 if dtype in (torch.float16, torch.bfloat16) else e     # linear stages compute in float32 or 64
    lse_e = 8 if dtype == torch.float64 else 4
    b = _Bytes(world_size)
    keys_in, keys_out = [0] * world_size, [0] * world_size
    kinds, names = stage_kinds(op.ir), sorted({x for st in op.ir.stages for x in M.runtime_inputs(st.mask)})
    for name in names:                                  # the ids are all-gathered first, padded to the longest shard
        b.gather("fwd", batch * max(sh.sizes), 8)
    for st in op.ir.stages:
        hs = heads if st.heads is None else st.heads[1] - st.heads[0]
        bh, bhk, D = batch * hs, batch * _kv_heads(st, hs, heads // kv_heads), head_dim
        params = dict(op.ir.params)
        norm = st.normaliser
        if isinstance(norm, Softmax) and kinds[st.name] == (True, True):
            ids = {x: runtime[x] for x in M.runtime_inputs(st.mask)} if runtime else None
            plan = halo_plan(st.mask, sh, runtime=ids)
            for r in range(world_size):
                sent, got = plan.keys_sent(r), plan.keys_received(r)
                keys_in[r] += int(_share(st, op.ir) * got)
                keys_out[r] += int(_share(st, op.ir) * sent)
                b.fwd[r] += sent * bhk * 2 * D * e + (sent * batch if padding else 0)
                b.bwd[r] += got * bhk * 2 * D * e
            g = len(plan.rows)
            b.reduce("fwd", bh * g * D, e)
            b.gather("fwd", bh * g * (D + 1), lse_e)
            b.reduce("bwd", bh * g * D, lse_e)
            b.reduce("bwd", bh * g * D, e)
        elif isinstance(norm, Softmax) and kinds[st.name] == (False, True):
            length = params[st.query]
            b.gather("fwd", bh * length * (D + 1), lse_e)
            b.reduce("bwd", bh * length * D, lse_e)
        elif isinstance(norm, Linear) and kinds[st.name][1]:
            _linear_bytes(b, norm.feature_map, st.causal, bhk, D, work_e, sh)
        elif isinstance(norm, Nested):
            _state_bytes(b, bh * (2 * D * params[norm.packed] + 1), work_e, sh)
    n = sh.sizes
    ring = [(seq_len - n[(r + 1) % world_size]) * batch * kv_heads * 2 * head_dim * e if world_size > 1 else 0
            for r in range(world_size)]
    grouped = f", H_kv = {kv_heads}" if kv_heads != heads else ""
    shape = f"B = {batch}, H = {heads}{grouped}, D = {head_dim}, {str(dtype).replace('torch.', '')}"
    return Report(op.name, sh, shape, n, tuple(rank_work(position_costs(op, seq_len), sh)), tuple(keys_in),
                  tuple(keys_out), tuple(b.fwd), tuple(b.bwd), tuple(ring), tuple(2 * x for x in ring))


def _kv_heads(st, hs: int, groups: int) -> int:
    """The kv heads a stage's keys have (as `op/graph.stage_kv` slices them): a group's when its heads are
    whole groups, else one per query head; keys from a stage or a param have one per query head."""
    if st.keys != INPUT:
        return hs
    if st.heads is None:
        return hs // groups
    a, b = st.heads
    return (b - a) // groups if a % groups == 0 and b % groups == 0 else b - a


def _linear_bytes(b: _Bytes, fm, causal: bool, bh: int, D: int, e: int, sh) -> None:
    m = getattr(fm, "features", D)
    if causal:
        _state_bytes(b, bh * (m * D + m + D + 2), e, sh)
        return
    if isinstance(fm, Favor):
        b.reduce("fwd", bh, e)
        b.reduce("bwd", bh, e)
        b.reduce("bwd", bh, e)          # the count of ranks holding the max
    b.reduce("fwd", bh * m * (D + 1), e)
    b.reduce("bwd", bh * m * (D + 1), e)


def _state_bytes(b: _Bytes, per_segment: int, e: int, sh) -> None:
    most = max(len(s) for s in sh.segments)
    b.gather("fwd", most * per_segment, e)
    b.reduce("bwd", sh.world_size * most * per_segment, e)
