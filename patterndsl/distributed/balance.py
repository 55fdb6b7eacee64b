"""Load balance: the work each position brings, from the layout's tile costs, and the sharding that spreads it.

A softmax stage's work is the pairs of its nonempty tiles (a tile is computed whole, partial or full), read
per query tile from the closed-form layout of the mask without its global rows; the global rows are split
over the ranks' keys, so they add `|rows|` pairs to every key position. A linear stage does `m` feature
products per token, causal Luna `l` per token, Luna's pack and unpack `l` per token: flat costs. Stages are
weighted by their share of the heads. Among `contiguous` and `zigzag`, the sharding with the least work on
its busiest rank wins; within `TIE` of each other, the one whose busiest rank receives fewer keys.

>>> import patterndsl as pd
>>> choose(pd.compile("longformer", window=64), 4096, 4).kind, choose(pd.compile("prefix_lm"), 4096, 4).kind
('contiguous', 'zigzag')
"""
from __future__ import annotations

import functools

import torch

from ..ir.program import INPUT, Linear, Nested, Softmax
from ..plan.layout import tile_layout
from .halo import global_rows, halo_plan, without_rows
from .sharding import Sharding, contiguous, zigzag

COST_BLOCK = 128   # tiles of the cost estimate
TIE = 0.05         # relative work difference under which bytes decide


def stage_kinds(ir) -> dict[str, tuple[bool, bool]]:
    """Per stage: (queries sharded, keys sharded). The input is sharded, params are replicated, and a stage's
    output is sharded when its queries are."""
    sharded, out = {INPUT}, {}
    for st in ir.stages:
        out[st.name] = (st.query in sharded, st.keys in sharded)
        if out[st.name][0]:
            sharded.add(st.name)
    return out


def _share(stage, ir) -> float:
    if stage.heads is None or ir.num_heads is None:
        return 1.0
    return (stage.heads[1] - stage.heads[0]) / ir.num_heads


@functools.lru_cache(maxsize=32)
def _softmax_costs(mask, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query position, per key position) pairs of a sharded softmax stage."""
    rest, rows = without_rows(mask), global_rows(mask, n)
    block = max(COST_BLOCK, -(-n // 1024))            # at most 1024 x 1024 tiles, at any length
    lay = tile_layout(rest, n, n, block, block)
    g = lay.grid
    c0, c1 = g.col_bounds(lay.col_idx)
    per_tile = torch.zeros(g.nqb, dtype=torch.float64).index_add_(0, lay.row_ids(), (c1 - c0 + 1).double())
    rows_of = torch.arange(n) // block
    q_cost = per_tile[rows_of] if n else torch.zeros(0, dtype=torch.float64)
    return q_cost, torch.full((n,), float(len(rows)), dtype=torch.float64)


def position_costs(op, n: int) -> torch.Tensor:
    """float64 `[n]`: the work (pairs or feature products, per head) each position brings to its rank."""
    ir, cost = op.ir, torch.zeros(n, dtype=torch.float64)
    params, kinds = dict(ir.params), stage_kinds(ir)
    for st in ir.stages:
        w = _share(st, ir)
        norm = st.normaliser
        if isinstance(norm, Softmax) and kinds[st.name] == (True, True):
            q_cost, k_cost = _softmax_costs(st.mask, n)
            cost += w * (q_cost + k_cost)
        elif isinstance(norm, Softmax):
            cost += w * params.get(st.query, params.get(st.keys, 1))
        elif isinstance(norm, Linear):
            cost += w * getattr(norm.feature_map, "features", 64)
        elif isinstance(norm, Nested):
            cost += w * params[norm.packed]
    return cost


def rank_work(cost: torch.Tensor, sharding: Sharding) -> list[float]:
    """The work of each rank: the costs of the positions it holds."""
    return [float(sum(cost[a:b].sum() for a, b in segs)) for segs in sharding.segments]


def received_keys(op, sharding: Sharding) -> list[int]:
    """Keys each rank receives, over the sharded softmax stages (weighted by their heads)."""
    total, kinds = [0.0] * sharding.world_size, stage_kinds(op.ir)
    for st in op.ir.stages:
        if isinstance(st.normaliser, Softmax) and kinds[st.name] == (True, True):
            plan = halo_plan(st.mask, sharding)
            for r in range(sharding.world_size):
                total[r] += _share(st, op.ir) * plan.keys_received(r)
    return [int(x) for x in total]


def choose(op, n: int, world_size: int, sharding="auto") -> Sharding:
    """The sharding to run `op` with at length n: `sharding` if given (a `Sharding`, "contiguous" or
    "zigzag"), else the better-balanced of the two."""
    from ..errors import PatternError
    if isinstance(sharding, Sharding):
        if sharding.seq_len != n or sharding.world_size != world_size:
            raise PatternError(f"the sharding is for {sharding.seq_len} tokens over {sharding.world_size} ranks, "
                               f"but the call has {n} tokens over {world_size} ranks")
        return sharding
    makers = {"contiguous": contiguous, "zigzag": zigzag}
    if sharding in makers:
        return makers[sharding](n, world_size)
    if sharding != "auto":
        raise PatternError(f"unknown sharding {sharding!r}", hint="one of: auto, contiguous, zigzag, or a Sharding")
    cands = [contiguous(n, world_size), zigzag(n, world_size)]
    if world_size == 1:
        return cands[0]
    cost = position_costs(op, n)
    work = [max(rank_work(cost, s)) for s in cands]
    best = min(work)
    close = [s for s, wk in zip(cands, work) if wk <= best * (1 + TIE)]
    if len(close) == 1:
        return close[0]
    return min(close, key=lambda s: max(received_keys(op, s)))
