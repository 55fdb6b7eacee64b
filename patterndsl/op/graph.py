"""Running a program's stage graph on a checked `Call`: each stage's sources (its heads sliced, grouped kv heads
mapped), the backend call, and per-batch query offsets run as one call per distinct offset.

Grouped-query attention: k, v have `H_kv` heads and query head h reads kv head `h // G` (`G = H / H_kv`); the
backends take k, v as they are. A stage under `heads[a:b]` reads kv heads `a/G .. b/G - 1` when a and b are
multiples of G; otherwise its query heads do not share kv heads group by group, and that stage alone gets
kv head `h // G` for each of its heads, repeated (`stage_kv`). Stages reading keys from a param or another
stage's output see one key head per query head.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir.program import INPUT, Linear, Nested, Softmax, Stage
from .causal import run_isolated
from .lowered import stage_lowering
from .validate import Call


def stage_kv(heads: tuple[int, int] | None, x: torch.Tensor | None, groups: int):
    """The kv heads `x [B, H_kv, ...]` that query heads `heads` = (a, b) read (all of x when None)."""
    if heads is None or x is None:
        return x
    a, b = heads
    if groups == 1:
        return x[:, a:b]
    if a % groups == 0 and b % groups == 0:
        return x[:, a // groups:b // groups]
    return x.index_select(1, torch.arange(a, b, device=x.device) // groups)   # unaligned: repeated, this stage only


def stage_sources(st: Stage, call: Call, values: dict):
    """(q, k, v, key_padding_mask, pack keys, packed queries, q_offset) of stage `st`."""
    q = call.q if st.query == INPUT else values[st.query]
    if st.keys == INPUT:
        k, v, kpm, c, groups = call.k, call.v, call.key_padding_mask, call.pack_keys, call.groups
    else:
        k = v = values[st.keys]
        kpm, c, groups = None, None, 1
    p = values[st.normaliser.packed] if isinstance(st.normaliser, Nested) else None
    if st.heads is not None:
        a, b = st.heads
        q, p = q[:, a:b], (p[:, a:b] if p is not None else None)
        k, v, c = (stage_kv(st.heads, x, groups) for x in (k, v, c))
    offset = call.q_offset if st.query == INPUT else 0
    return q, k, v, kpm, c, p, offset


def run_graph(op, call: Call, backends: dict):
    """The program's outputs (a tensor, or a tuple in the order of `return`)."""
    if isinstance(call.q_offset, tuple):
        return _by_offset(op, call, backends)
    values = dict(call.params)
    for st in op.ir.stages:
        values[st.name] = run_stage(op, backends[st.name], st, call, values)
    if op.ir.by_heads:
        return torch.cat([values[o] for o in op.ir.outputs], dim=1)
    outs = tuple(values[o] for o in op.ir.outputs)
    return outs[0] if len(outs) == 1 else outs


def _empty(q, k, v, extra=()) -> torch.Tensor:
    """Zeros `[B, H, N_q, D_v]` still tied to the inputs, so a backward gives zero (or empty) gradients."""
    tied = sum((x.sum() for x in (q, k, v, *extra) if x is not None), q.new_zeros(())) * 0
    return q.new_zeros(*q.shape[:3], v.shape[3]) + tied


def run_stage(op, be, st: Stage, call: Call, values: dict) -> torch.Tensor:
    """One stage on its backend; a backend's error gets the stage and backend named, once, here."""
    try:
        return _run_stage(op, be, st, call, values)
    except PatternError as e:
        raise PatternError(f"stage {st.name} of {op.name} on the {be.name} backend: {e.message}", e.span, e.source,
                           e.hint) from None


def _run_stage(op, be, st: Stage, call: Call, values: dict) -> torch.Tensor:
    """One stage through the lowering the planner chose for its shapes (`lowered.py`)."""
    q, k, v, kpm, c, p, offset = stage_sources(st, call, values)
    norm = st.normaliser
    if q.shape[0] == 0 or (not isinstance(norm, Softmax) and (q.shape[2] == 0 or k.shape[2] == 0)):
        return _empty(q, k, v, (c, p))       # no batch row, or no query or key of a linear form: zeros
    if isinstance(norm, Softmax) and st.score is not None:   # score terms: the backend's scored path
        from .scores import run_scored
        return run_scored(be, st, q, k, v, kpm, call, offset)
    run = stage_lowering(op, st, q, k, v, kpm, 0 if p is None else p.shape[2], offset).run
    if isinstance(norm, Softmax):
        scale = norm.scale if norm.scale is not None else q.shape[-1] ** -0.5
        return run(st, q, k, v, scale=scale, key_padding_mask=kpm, runtime=call.runtime, q_offset=offset)
    kw = dict(key_padding_mask=kpm, q_offset=offset)
    if isinstance(norm, Linear):
        kw["projection"] = op.projection(st, q.shape[-1], q.device, q.dtype)
    else:
        kw["p"] = p
    if st.causal and be.name != "reference":       # the reference is the dense definition: nothing to guard
        return run_isolated(lambda *a, **x: run(st, *a, **x), q, k, v, c, offset, **kw)
    return run(st, q, k, v, **({"c": c} if isinstance(norm, Nested) else {}), **kw)


def select_rows(call: Call, rows: torch.Tensor, offset: int) -> Call:
    """The call restricted to batch rows `rows`, all at query offset `offset`."""
    pick = (lambda x: None if x is None else x.index_select(0, rows))  # noqa: E731
    runtime = {n: (pick(a), pick(b)) for n, (a, b) in call.runtime.items()}
    return Call(pick(call.q), pick(call.k), pick(call.v), pick(call.key_padding_mask), offset, runtime,
                {n: pick(t) for n, t in call.params.items()}, pick(call.pack_keys))


def _by_offset(op, call: Call, backends: dict):
    """Batch rows grouped by their query offset, one run per group, outputs put back in batch order."""
    parts, order = [], []
    for offset in sorted(set(call.q_offset)):
        rows = [b for b, o in enumerate(call.q_offset) if o == offset]
        out = run_graph(op, select_rows(call, torch.tensor(rows, device=call.q.device), offset), backends)
        parts.append(out if isinstance(out, tuple) else (out,))
        order += rows
    back = torch.argsort(torch.tensor(order, device=call.q.device))
    outs = tuple(torch.cat(group, 0).index_select(0, back) for group in zip(*parts))
    return outs[0] if len(outs) == 1 else outs
