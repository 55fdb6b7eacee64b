"""The Plan: how a program runs at given shapes (schedule, per stage every candidate lowering with its
predicted time, the chosen one and why, its heads and mask, tiles, symbolic costs, the N from which it beats
dense attention).

The pattern never changes with the plan; plans are cached by (IR normal form, shapes, dtype, device,
requested backend, calibration), so changing a parameter (a new IR) never reuses a stale plan.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import networkx as nx
import sympy
import torch

from ..ir import mask as M
from ..ir.program import ProgramIR, Softmax, Stage
from .calibrate import constants as device_constants, generation
from .cost import N, complexity, lengths, stage_costs
from .layout import PARTIAL, tile_layout
from .lowering import Problem, declared, lowering, stage_kind
from .model import Constants, fmt_seconds, predict
from .select import Choice, choose

_MAX_TABULATED = 1 << 17  # tile statistics are tabulated up to this many tokens
_BLOCK = (64, 64)


@dataclass(frozen=True)
class CandidateLine:
    name: str
    predicted: float | None      # seconds per call (None: does not apply)
    once: float                  # one-time seconds (a compile not yet paid)
    why_not: str | None
    chosen: bool
    note: str


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str
    backend: str
    why: str
    kernel: str                  # the chosen lowering and what it does
    heads: str                   # "all" or "a:b"
    mask: str
    candidates: tuple[CandidateLine, ...]
    block: tuple[int, int] | None
    tiles: tuple[int, int, int] | None  # nonzero, partial, total
    pairs: sympy.Expr
    flops: sympy.Expr
    bytes: sympy.Expr
    memory: sympy.Expr
    complexity: str
    beats_dense_from: int | None

    @property
    def lowering(self) -> str:
        return self.kernel.split(":")[0]

    @property
    def predicted(self) -> float | None:
        return next(c.predicted for c in self.candidates if c.chosen)


@dataclass(frozen=True)
class Plan:
    program: str
    seq_len: int
    head_dim: int
    device: str
    dtype: str
    schedule: tuple[str, ...]
    stages: tuple[StagePlan, ...]
    batch: int = 1
    heads: int = 4
    grad: bool = False
    constants: str = "defaults"

    def summary(self) -> str:
        return ", ".join(f"{s.name}: {s.lowering} {s.complexity}" for s in self.stages)

    def __str__(self) -> str:
        n = self.seq_len
        mode = "forward and backward" if self.grad else "forward"
        out = [f"plan for {self.program} at N = {n}, head_dim = {self.head_dim}, {self.dtype} on {self.device}",
               f"shapes: B = {self.batch}, H = {self.heads}, {mode}; constants: {self.constants}",
               f"schedule: {' -> '.join(self.schedule)}"]
        for s in self.stages:
            out += _stage_lines(s, n)
        return "\n".join(out)


def _stage_lines(s: StagePlan, n: int) -> list[str]:
    out = [f"stage {s.name}: {s.kind} over {s.mask}, heads {s.heads}, on backend '{s.backend}'",
           f"  kernel  {s.kernel}", f"  why     {s.why}", "  candidates (predicted time per call):"]
    for c in sorted(s.candidates, key=lambda c: (c.predicted is None, c.predicted or 0.0)):
        if c.predicted is None:
            out.append(f"    ->{c.name:<26} {c.why_not}" if c.chosen else
                       f"      {c.name:<26} does not apply: {c.why_not}")
            continue
        once = f" + {fmt_seconds(c.once)} once" if c.once else ""
        note = f"  ({c.note})" if c.note else ""
        out.append(f"    {'->' if c.chosen else '  '}{c.name:<26} {fmt_seconds(c.predicted):>9}{once}{note}")
    if s.tiles is None and s.kind == "softmax" and n > _MAX_TABULATED:
        out.append(f"  tiles   not tabulated above N = {_MAX_TABULATED} (op.block_layout(n) gives them)")
    if s.tiles is not None:
        nz, part, total = s.tiles
        out.append(f"  tiles {s.block[0]}x{s.block[1]}: {nz} of {total} nonzero ({nz / total:.1%}), "
                   f"{part} partial (element mask), {nz - part} full (no mask)")
    p_now = float(s.pairs.subs(N, n))
    out.append(f"  pairs   = {s.pairs}  = {p_now:.4g} at N = {n} (density {p_now / max(n * n, 1):.2%})")
    out.append(f"  FLOPs   = {s.flops}  = {float(s.flops.subs(N, n)):.4g} per (batch, head) (useful pairs only)")
    out.append(f"  bytes   = {s.bytes}  = {float(s.bytes.subs(N, n)):.4g} moved per (batch, head) "
               f"(inputs read once, output written once)")
    out.append(f"  memory  = {s.memory} bytes  = {float(s.memory.subs(N, n)):.4g} per (batch, head)")
    beat = (f"beats dense attention from N = {s.beats_dense_from} (predicted times of the work done)"
            if s.beats_dense_from else "never predicted faster than dense attention (up to N = 2^18)")
    out.append(f"  class   {s.complexity}; {beat}")
    return out


def make_plan(op, seq_len: int, head_dim: int = 64, device=torch.device("cpu"), dtype=torch.float32,
              batch: int = 1, heads: int | None = None, grad: bool = False, kv_heads: int | None = None,
              q_offset: int = 0) -> Plan:
    """The plan for `op` at these shapes (cached); `kv_heads` < heads: grouped-query attention; `q_offset`:
    the queries' first position. The backends' lowerings must be declared (`patterndsl.backends.declare_all`;
    the op does it): the plan layer reads declarations and never imports a backend."""
    heads = heads or op.ir.num_heads or 4
    device = torch.device(device)
    return _plan(op.ir, int(seq_len), int(head_dim), device, dtype, op.backend, int(batch), int(heads),
                 bool(grad), generation(), int(kv_heads or heads), int(q_offset))


@functools.lru_cache(maxsize=512)
def _plan(ir: ProgramIR, seq_len, head_dim, device, dtype, requested, batch, heads, grad, gen, kv_heads=0,
          q_offset=0) -> Plan:
    consts = device_constants(device)
    elt = torch.finfo(dtype).bits // 8
    rows = lengths(ir)
    stages = []
    for st in ir.stages:
        n_q, n_k = (int(rows[x].subs(N, seq_len)) for x in (st.query, st.keys))
        h = heads if st.heads is None else st.heads[1] - st.heads[0]
        packed = dict(ir.params).get(getattr(st.normaliser, "packed", None), 0)
        grouped = st.keys == "input" and kv_heads and heads % kv_heads == 0 and h % (heads // kv_heads) == 0
        problem = Problem(st, batch, h, n_q, n_k, head_dim, head_dim, dtype, device, False, grad, packed,
                          kv_heads=h // (heads // kv_heads) if grouped else h,
                          q_offset=q_offset if st.query == "input" else 0)
        choice = choose(problem, requested, consts)
        symbolic = (rows[st.query], rows[st.keys])
        stages.append(_stage_plan(st, problem, choice, consts, seq_len, head_dim, elt, symbolic))
    order = tuple(n for n in nx.topological_sort(ir.graph()) if n in {s.name for s in ir.stages})
    return Plan(ir.name, seq_len, head_dim, str(device), str(dtype).replace("torch.", ""), order, tuple(stages),
                batch, heads, grad, consts.source)


def _note(cd, consts, grad: bool) -> str:
    """The candidate's work note, and its calibrated fit factor when it has one (`model.py`)."""
    fit = consts.fit(cd.lowering.name, grad) if cd.prediction is not None else 1.0
    return "; ".join(x for x in ((cd.work.note if cd.work else ""), f"x{fit:.2f} fit" if fit != 1.0 else "") if x)


def _stage_plan(st: Stage, problem: Problem, choice: Choice, consts, seq_len, head_dim, elt, symbolic):
    c = stage_costs(st, head_dim, elt, *symbolic, length=problem.packed or 16)
    n_q, n_k = problem.n_q, problem.n_k
    flops = c["flops"]
    block, tiles = None, None
    if problem.kind == "softmax" and st.query == "input" and st.keys == "input" and seq_len <= _MAX_TABULATED:
        block = _BLOCK
        layout = tile_layout(st.mask, n_q, n_k, *block, q_offset=problem.q_offset)
        tiles = (layout.nnz, int((layout.cls == PARTIAL).sum()), max(layout.shape[0] * layout.shape[1], 1))
    lines = tuple(CandidateLine(cd.lowering.name, None if cd.prediction is None else cd.prediction.seconds,
                                0.0 if cd.prediction is None else cd.prediction.once, cd.why_not,
                                cd.lowering is choice.chosen, _note(cd, consts, problem.grad))
                  for cd in choice.candidates)
    heads = "all" if st.heads is None else f"{st.heads[0]}:{st.heads[1]}"
    cls = "O(1)" if sympy.simplify(flops) == 0 else complexity(flops)
    kernel, why = f"{choice.chosen.name}: {choice.chosen.summary}", choice.why
    if st.score is not None:     # score terms run on the backend's scored path, not on a softmax lowering
        kernel, why, lines = _scored(st, choice.chosen.backend)
    return StagePlan(st.name, problem.kind, choice.chosen.backend, why, kernel, heads, M.to_source(st.mask), lines,
                     block, tiles, c["pairs"], flops, sympy.simplify(c["bytes"]), c["memory"], cls,
                     beats_dense_from(problem, choice, consts))


def _scored(st: Stage, backend: str):
    """(kernel, why, candidates) of a stage with score terms (docs/language.md §5.5-5.6)."""
    what = ("exact near-field tiles plus FAVOR+ totals minus near terms" if st.score.far is not None
            else "gathered tiles of the mask with the terms applied (explicit scores, autograd or generated kernels)")
    note = "no calibrated time model for score terms yet: their cost is the FLOPs and memory below"
    return (f"{backend}.scored: {what}", f"score terms ({st.score.source()}) run on the backend's scored path",
            (CandidateLine(f"{backend}.scored", None, 0.0, note, True, ""),))


# ------------------------------------------------------------------------------------- against dense
def _dense_problem(p: Problem, n: int) -> list[Problem]:
    """Dense attention over the same pairs' envelope at length n: a softmax stage over full (or causal)."""
    mask = M.CAUSAL if (p.kind != "softmax" and p.stage.causal) else M.FULL
    dense_stage = Stage(p.stage.name, Softmax(), mask)
    return [Problem(dense_stage, p.batch, p.heads, n, n, p.head_dim, p.head_dim_v, p.dtype, p.device, False,
                    p.grad)]


def _dense_seconds(p: Problem, consts: Constants) -> float | None:
    best = None
    for name in ("torch.causal", "torch.dense"):
        try:
            lw = lowering(name)
        except KeyError:
            continue
        if name == "torch.causal" and p.stage.mask != M.CAUSAL:
            continue
        s = predict(lw.work(p), consts, p.dtype).seconds
        best = s if best is None else min(best, s)
    return best


def beats_dense_from(problem: Problem, choice: Choice, consts: Constants) -> int | None:
    """The smallest power of two N (64 .. 2^18) at which the chosen lowering is predicted faster than dense
    attention (SDPA over the full or causal envelope) at the same shapes; None if it never is."""
    st = problem.stage
    if st.query != "input" and st.keys != "input":
        return None
    lw = choice.chosen
    for k in range(6, 19):
        n = 1 << k
        n_q = n if st.query == "input" else problem.n_q
        n_k = n if st.keys == "input" else problem.n_k
        p = Problem(st, problem.batch, problem.heads, n_q, n_k, problem.head_dim, problem.head_dim_v,
                    problem.dtype, problem.device, False, problem.grad, problem.packed, problem.kv_heads)
        if lw.applies(p) is not None:
            continue
        dense = _dense_seconds(_dense_problem(p, n)[0], consts)
        if dense is not None and predict(lw.work(p), consts, p.dtype, paid=True).seconds < dense:
            return n
    return None


def kinds_declared() -> dict[str, list[str]]:
    """Declared lowering names by stage kind (for reports)."""
    out: dict[str, list[str]] = {}
    for lw in declared():
        for k in lw.kinds:
            out.setdefault(k, []).append(lw.name)
    return out


__all__ = ["Plan", "StagePlan", "CandidateLine", "make_plan", "beats_dense_from", "stage_kind", "kinds_declared"]
