"""Workloads for the user subcommands: random inputs for any op, stage shapes, example ids, and timing.

>>> import patterndsl as pd
>>> from patterndsl.ir.mask import sliding
>>> from patterndsl.ir.program import ProgramIR, Softmax, Stage
>>> op = pd.AttentionOp(None, ProgramIR("p", (Stage("out", Softmax(), sliding(2)),), ("out",)))
>>> q, k, v, extra = make_inputs(op, 1, 2, 16, 8)
>>> tuple(q.shape), extra
((1, 2, 16, 8), {})
"""
from __future__ import annotations

import statistics
import time

import torch

from ..ir import mask as M
from ..ir.program import INPUT, Nested


def example_ids(batch: int, n: int, device=None) -> torch.LongTensor:
    """Segment ids `[batch, n]` cutting each row into a few documents of uneven lengths (for `same(...)`)."""
    g = torch.Generator().manual_seed(n)
    ids = []
    for _ in range(batch):
        cuts = torch.randint(1, max(2, n), (3,), generator=g).sort().values
        ids.append(torch.bucketize(torch.arange(n), cuts, right=True))
    return torch.stack(ids).to(device)


def heads_for(op, heads: int) -> int:
    """The head count to run `op` with: the program's own for per-head programs, or the rows of its bias
    tables (one per head), else `heads`."""
    if op.ir.tables:
        return op.ir.tables[0][1]
    return op.ir.num_heads if op.ir.num_heads is not None else heads


def stage_lengths(ir, n: int) -> dict[str, tuple[int, int]]:
    """(query rows, key rows) of every stage when the input has `n` tokens (params have their own length)."""
    lengths = {INPUT: n, **dict(ir.params)}
    out = {}
    for st in ir.stages:
        out[st.name] = (lengths[st.query], lengths[st.keys])
        lengths[st.name] = lengths[st.query]
    return out


def runtime_example(op, batch: int, n: int, device=None) -> dict:
    """Example ids for every `same(name)` the program reads."""
    names = {nm for st in op.ir.stages for nm in M.runtime_inputs(st.mask)}
    return {nm: example_ids(batch, n, device) for nm in sorted(names)}


def make_inputs(op, batch: int, heads: int, n: int, head_dim: int, dtype=torch.float32, device="cpu",
                seed: int = 0, requires_grad: bool = False):
    """Random q, k, v `[B, H, n, D]` and the op's extra inputs (params `[l, D]`, bias tables, ids, Luna's `c`)."""
    g = torch.Generator().manual_seed(seed)
    H = heads_for(op, heads)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)
    q, k, v = (rand(batch, H, n, head_dim) for _ in range(3))
    extra = {name: rand(length, head_dim) for name, length in op.ir.params}
    extra.update({name: rand(rows, width) for name, rows, width in op.ir.tables})   # bias tables [H, width]
    extra.update(runtime_example(op, batch, n, device))
    if any(isinstance(st.normaliser, Nested) for st in op.ir.stages):
        extra["c"] = rand(batch, H, n, head_dim)
    return q, k, v, extra


def dense_mask_for(op, n: int, batch: int = 1, device=None) -> torch.Tensor | None:
    """The op's mask as an SDPA `attn_mask` `[B, H or 1, n, n]` (None when full), with example ids for
    `same(...)`: per-head programs get each head group's mask."""
    from ..ir.dense import dense_mask
    ir = op.ir
    stages = [ir.stage(o) for o in ir.outputs] if ir.by_heads else [ir.stage(ir.outputs[0])]
    if not ir.by_heads and stages[0].mask == M.FULL:
        return None
    runtime = runtime_example(op, batch, n, device)
    parts = []
    for st in stages:
        m = dense_mask(st.mask, n, n, runtime, device).expand(batch, n, n)
        reps = st.heads[1] - st.heads[0] if st.heads else 1
        parts.append(m[:, None].expand(batch, reps, n, n))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def sdpa_dense(op, n: int, batch: int = 1, device=None):
    """`f(q, k, v)`: dense SDPA over the op's mask (`is_causal` for a plain causal mask)."""
    import torch.nn.functional as F
    first = op.ir.stage(op.ir.outputs[0])
    if not op.ir.by_heads and first.mask == M.CAUSAL:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = dense_mask_for(op, n, batch, device)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def time_ms(fn, device, repeat: int = 5, warmup: int = 1, budget_s: float | None = None) -> float:
    """Median wall-clock milliseconds of `fn()` (CUDA synchronised); stops early past `budget_s`."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        start = time.perf_counter()
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
    return statistics.median(times)
