"""Properties of a program, proved for every N where the closed forms allow: future access per stage and for
the whole dataflow, rows with no allowed key, allowed pairs, density and tiles as expressions in N.

>>> print(properties("prefix_lm", prefix=4))
prefix_lm: not causal: stage 1 lets a query see a later key (i=0, j=1 (N = 2))
  stage 1 = attend softmax over causal | cols(range(0, 4))
    future keys: yes, first at i=0, j=1 (N = 2)
    rows with no key: none, for every N
    allowed pairs: N**2/2 + N/2 + 6 for N >= 4
    density: 1/2 + 1/(2*N) + 6/N**2
    tiles 64x64 at N = 64*T: nonempty T**2/2 + T/2 (T >= 1), full T**2/2 - T/2 (T >= 1)
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import INPUT, ProgramIR, Softmax, Stage
from ..plan.cost import pairs
from .contain import DEFAULT_BOUND, Inclusion, check_bound, inclusion
from .counting import N, QuasiPoly, TileCounts, pair_count, tile_counts
from .rows import EmptyRows, empty_rows
from .subjects import rows_of, subject


@dataclass(frozen=True)
class StageProperties:
    """One stage: `future` is `mask <= causal` (None when its rows are not token positions), `empty` its
    empty rows for every N (None: outside the fragment; `empty_note` then says what is known), `pairs` and
    `tiles` exact expressions (None when they could not be derived)."""
    label: str
    stage: Stage
    future: Inclusion | None
    empty: EmptyRows | None
    empty_note: str
    pairs: QuasiPoly | None
    tiles: TileCounts | None

    @property
    def causal(self) -> bool | None:
        return None if self.future is None else self.future.holds

    def lines(self) -> list[str]:
        out = [f"{self.label} = {_short(self.stage)}"]
        if self.future is None:
            out.append("  future keys: n/a (its rows or keys are not token positions)")
        elif self.future.holds:
            how = "proved for every N" if self.future.proved else f"checked for {self.future.checked}"
            out.append(f"  future keys: none, {how}")
        else:
            out.append(f"  future keys: yes, first at {self.future.missing}")
        out.append(f"  rows with no key: {self.empty if self.empty is not None else self.empty_note}")
        if self.future is None:
            return out
        if self.pairs is not None:
            out.append(f"  allowed pairs: {self.pairs}")
            out.append(f"  density: {_density(self.pairs)}")
        else:
            out.append(f"  allowed pairs: at most about {pairs(self.stage.mask)} (first order; no exact form "
                       "for this mask)")
        if self.tiles is not None:
            b, t = self.tiles.block, self.tiles
            out.append(f"  tiles {b}x{b} at N = {b}*T: nonempty {t.nonempty.short()}, full {t.full.short()}")
        return out


def _short(st: Stage) -> str:
    text = st.describe().split(" = ", 1)[1].replace(" query input keys input", "")
    return text


def _density(q: QuasiPoly) -> str:
    if q.period == 1:
        return str(sympy.expand(q.polys[0] / N ** 2))
    lead = sympy.limit(q.polys[0] / N ** 2, N, sympy.oo)
    return f"pairs / N**2, tending to {lead}"


@dataclass(frozen=True)
class Properties:
    """A program's properties: `causal` for the dataflow (no output reads a later token), with `why` naming
    the first stage that breaks it, and one `StageProperties` per stage."""
    name: str
    causal: bool
    proved: bool
    why: str
    stages: tuple[StageProperties, ...]

    def __str__(self) -> str:
        unproved = [s.future for s in self.stages if s.future is not None and not s.future.proved]
        how = f"checked for {unproved[0].checked}" if unproved else "proved for every N"
        head = (f"{self.name}: causal (no output reads a later token), {how}" if self.causal else
                f"{self.name}: not causal: {self.why}")
        return "\n".join([head] + ["  " + line for s in self.stages for line in s.lines()])


def _label(st: Stage, k: int) -> str:
    heads = f"heads[{st.heads[0]}:{st.heads[1]}] " if st.heads else ""
    return heads + (f"stage {k + 1}" if st.name.startswith("_") else f"stage {st.name}")


def _empty(m: M.Mask, positional: bool) -> tuple[EmptyRows | None, str]:
    if not positional:
        return None, "n/a (its rows or keys are not token positions)"
    diagonal = inclusion(M.band(0, 0), m)
    if diagonal.holds and diagonal.proved:                     # every row sees itself
        return EmptyRows(()), ""
    rows = empty_rows(m)
    if rows is not None:
        return rows, ""
    return None, "not decided for every N (the mask reads runtime ids, random draws, or a predicate " \
                 "outside the closed forms); `op.mask(n)` shows the rows at one N"


def stage_properties(st: Stage, k: int, positional: bool, bound: int = DEFAULT_BOUND,
                     block: int = 64) -> StageProperties:
    future = inclusion(st.mask, M.CAUSAL, bound) if positional else None
    empty, note = _empty(st.mask, positional)
    if not positional:
        return StageProperties(_label(st, k), st, None, None, note, None, None)
    return StageProperties(_label(st, k), st, future, empty, note, pair_count(st.mask),
                           tile_counts(st.mask, block))


def _flow(ir: ProgramIR, per: dict) -> tuple[bool, str]:
    """Whether every output reads only earlier tokens: a stage is causal when its rows are positions, its
    mask has no future keys and its sources are causal; a stage whose queries are a param mixes every token
    its keys hold."""
    kind = {INPUT: "causal", **{name: "constant" for name, _ in ir.params}}
    why = {}
    for k, st in enumerate(ir.stages):
        q, kv = kind[st.query], kind[st.keys]
        if q == "constant":
            kind[st.name] = "constant" if kv == "constant" else "mixed"
            why[st.name] = f"{per[st.name].label} has param queries that read every token of {st.keys}"
            continue
        bad = [src for src in (st.query, st.keys) if kind[src] in ("mixed", "future")]
        if bad:
            kind[st.name] = "future"
            why[st.name] = why[bad[0]] if kind[bad[0]] == "future" else (
                f"{per[st.name].label} reads {bad[0]}, and {why[bad[0]]}")
        elif per[st.name].future is not None and not per[st.name].future.holds:
            kind[st.name] = "future"
            why[st.name] = f"{per[st.name].label} lets a query see a later key ({per[st.name].future.missing})"
        else:
            kind[st.name] = "causal"
    bad = [o for o in ir.outputs if kind[o] != "causal"]
    return (not bad), (why.get(bad[0], f"output {bad[0]} is not a token sequence") if bad else "")


def program_properties(ir: ProgramIR, bound: int = DEFAULT_BOUND, block: int = 64) -> Properties:
    """Properties of a lowered program (see `Properties`)."""
    check_bound(bound)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise PatternError(f"the tile size must be an int >= 1, got {block!r}")
    per = {}
    for k, st in enumerate(ir.stages):
        positional = rows_of(ir, st.query) == INPUT and rows_of(ir, st.keys) == INPUT
        per[st.name] = stage_properties(st, k, positional, bound, block)
    causal, why = _flow(ir, per)
    proved = all(p.future is None or p.future.proved for p in per.values())
    return Properties(ir.name, causal, proved, why, tuple(per.values()))


def properties(program, bound: int = DEFAULT_BOUND, block: int = 64, **params) -> Properties:
    """Properties of a program (anything `pd.compile` takes, an op, or IR), parameters overriding defaults."""
    ir = subject(program, params or None)
    if isinstance(ir, M.Mask):
        ir = ProgramIR("mask", (Stage("mask", Softmax(), ir),), ("mask",))
    return program_properties(ir, bound, block)
