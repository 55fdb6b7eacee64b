"""The Plan: how a program runs at given shapes (schedule, backend per stage and why, tiles, costs).

The pattern never changes with the plan; plans are cached by (IR normal form, shapes, dtype, device,
requested backend), so changing a parameter (a new IR) never reuses a stale plan.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import networkx as nx
import sympy
import torch

from ..ir.program import Linear, ProgramIR, Softmax
from .cost import N, complexity, crossover, lengths, stage_costs
from .layout import PARTIAL, tile_layout
from .select import auto_order

_MAX_TABULATED = 1 << 17  # tile statistics are tabulated up to this many tokens


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str
    backend: str
    why: str
    kernel: str
    block: tuple[int, int] | None
    tiles: tuple[int, int, int] | None  # nonzero, partial, total
    pairs: sympy.Expr
    flops: sympy.Expr
    bytes: sympy.Expr
    memory: sympy.Expr
    complexity: str
    beats_dense_from: int | None


@dataclass(frozen=True)
class Plan:
    program: str
    seq_len: int
    head_dim: int
    device: str
    dtype: str
    schedule: tuple[str, ...]
    stages: tuple[StagePlan, ...]

    def summary(self) -> str:
        return ", ".join(f"{s.name}: {s.kind}/{s.backend} {s.complexity}" for s in self.stages)

    def __str__(self) -> str:
        n = self.seq_len
        out = [f"plan for {self.program} at N = {n}, head_dim = {self.head_dim}, {self.dtype} on {self.device}",
               f"schedule: {' -> '.join(self.schedule)}"]
        for s in self.stages:
            out.append(f"stage {s.name}: {s.kind} on backend '{s.backend}' ({s.why})")
            out.append(f"  kernel  {s.kernel}")
            if s.tiles is None and s.kind == "softmax" and n > _MAX_TABULATED:
                out.append(f"  tiles   not tabulated above N = {_MAX_TABULATED} (op.block_layout(n) gives them)")
            if s.tiles is not None:
                nz, part, total = s.tiles
                out.append(f"  tiles {s.block[0]}x{s.block[1]}: {nz} of {total} nonzero ({nz / total:.1%}), "
                           f"{part} partial (element mask), {nz - part} full (no mask)")
            p_now = float(s.pairs.subs(N, n))
            out.append(f"  pairs   = {s.pairs}  = {p_now:.4g} at N = {n} (density {p_now / n / n:.2%})")
            out.append(f"  FLOPs   = {s.flops}  = {float(s.flops.subs(N, n)):.4g} per (batch, head)")
            out.append(f"  bytes   = {s.bytes}  = {float(s.bytes.subs(N, n)):.4g} moved per (batch, head) "
                       f"(inputs read once, output written once)")
            out.append(f"  memory  = {s.memory} bytes  = {float(s.memory.subs(N, n)):.4g} per (batch, head)")
            beat = f"beats dense attention's work from N = {s.beats_dense_from}" if s.beats_dense_from else \
                "never does less work than dense attention"
            out.append(f"  class   {s.complexity}; {beat}")
        return "\n".join(out)


def make_plan(op, seq_len: int, head_dim: int = 64, device=torch.device("cpu"), dtype=torch.float32,
              **shape) -> Plan:
    """The plan for `op` at these shapes (cached)."""
    choice = tuple(sorted(op.backends(device).items()))
    return _plan(op.ir, int(seq_len), int(head_dim), str(device), str(dtype).replace("torch.", ""),
                 op.backend, choice)


@functools.lru_cache(maxsize=512)
def _plan(ir: ProgramIR, seq_len, head_dim, device, dtype, requested, choice) -> Plan:
    from ..backends import get_backend
    chosen = dict(choice)
    elt = torch.finfo(getattr(torch, dtype)).bits // 8
    order = tuple(n for n in nx.topological_sort(ir.graph()) if n in chosen)
    stages = []
    rows = lengths(ir)
    for st in ir.stages:
        c = stage_costs(st, head_dim, elt, rows[st.query], rows[st.keys])
        kind = "softmax" if isinstance(st.normaliser, Softmax) else \
            "linear" if isinstance(st.normaliser, Linear) else "nested"
        why = "requested" if requested != "auto" else \
            f"auto on {torch.device(device).type}: the first of {', '.join(auto_order(torch.device(device)))} that runs it"
        be = get_backend(chosen[st.name])
        n_q, n_k = (int(rows[x].subs(N, seq_len)) for x in (st.query, st.keys))
        kernel = be.kernel(st, n_q, n_k) if hasattr(be, "kernel") else chosen[st.name]
        block, tiles = None, None
        if kind == "softmax" and st.query == "input" and st.keys == "input" and seq_len <= _MAX_TABULATED:
            block = tuple(be.block(head_dim, torch.device(device))) if hasattr(be, "block") else (64, 64)
            layout = tile_layout(st.mask, seq_len, seq_len, *block)
            tiles = (layout.nnz, int((layout.cls == PARTIAL).sum()), layout.shape[0] * layout.shape[1])
        stages.append(StagePlan(st.name, kind, chosen[st.name], why, kernel, block, tiles, c["pairs"], c["flops"],
                                sympy.simplify(c["bytes"]), c["memory"], complexity(c["flops"]),
                                crossover(c["flops"], head_dim)))
    return Plan(ir.name, seq_len, head_dim, device, dtype, order, tuple(stages))
