"""The program IR: attend stages (normaliser, mask, sources, head range) and the graph they form.

A `ProgramIR` is what a pattern means once its parameters have values: a tuple of stages in a schedule
(topological) order plus the names of the outputs. It holds no block sizes and no backend names. Equal
programs compare and hash equal (names and parameter bindings are carried for messages only), so the IR is
the cache key of plans and generated kernels.

>>> from patterndsl.ir.mask import sliding
>>> st = Stage("out", Softmax(), sliding(2))
>>> ProgramIR("p", (st,), ("out",)).graph().number_of_nodes()
2
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .mask import CAUSAL, FULL, Mask, to_source
from .scores import Score

INPUT = "input"


# ---------------------------------------------------------------------------------------------- normalisers
@dataclass(frozen=True)
class Softmax:
    """Exact softmax over the allowed keys; `scale` None means 1/sqrt(head_dim)."""
    scale: float | None = None


@dataclass(frozen=True)
class Favor:
    """FAVOR+ positive random features (Choromanski et al. 2021), see docs/language.md §5.2."""
    features: int
    orthogonal: bool = True
    scaling: int = 0
    eps: float = 1e-4
    seed: int = 0
    redraw: int = 0


@dataclass(frozen=True)
class ReluFeatures:
    """`relu(x' W^T) + 1e-3` with the same random projection as FAVOR+."""
    features: int
    orthogonal: bool = True
    seed: int = 0
    redraw: int = 0


@dataclass(frozen=True)
class Elu1:
    """`elu(x) + 1` (Katharopoulos et al. 2020): no projection."""


@dataclass(frozen=True)
class Linear:
    """`phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1)`; causal by prefix sums when the stage mask is causal."""
    feature_map: Favor | ReluFeatures | Elu1


@dataclass(frozen=True)
class Nested:
    """Causal Luna (Ma et al. 2021) through the packed queries of tensor param `packed`."""
    packed: str


Normaliser = Softmax | Linear | Nested
FeatureMap = Favor | ReluFeatures | Elu1


# -------------------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stage:
    """One attend: `query` attends to `keys` (keys and values come from the same source) under `mask`.

    Sources are `input` (the op's q, or its k and v), a tensor param, or another stage's output.
    For linear and nested stages the mask is FULL or CAUSAL (checked by the verifier).
    `heads` = (start, stop) restricts the stage to those heads (per-head hybrids).
    `score` holds a softmax stage's score terms (bias, soft cap, far field; None: plain scores).
    """
    name: str
    normaliser: Normaliser
    mask: Mask = FULL
    query: str = INPUT
    keys: str = INPUT
    heads: tuple[int, int] | None = None
    score: Score | None = None

    @property
    def causal(self) -> bool:
        return self.mask == CAUSAL

    @property
    def sources(self) -> tuple[str, ...]:
        extra = (self.normaliser.packed,) if isinstance(self.normaliser, Nested) else ()
        return (self.query, self.keys) + extra

    def describe(self) -> str:
        n = self.normaliser
        if isinstance(n, Softmax):
            norm = "softmax" + (f"[scale={n.scale:g}]" if n.scale is not None else "")
        elif isinstance(n, Linear):
            norm = f"linear({_fm(n.feature_map)})"
        else:
            norm = f"nested({n.packed})"
        heads = f"heads[{self.heads[0]}:{self.heads[1]}] " if self.heads else ""
        terms = f", {self.score.source()}" if self.score is not None else ""
        return (f"{heads}{self.name} = attend {norm} query {self.query} keys {self.keys} over "
                f"{to_source(self.mask)}{terms}")


def _fm(fm: FeatureMap) -> str:
    if isinstance(fm, Favor):
        return (f"favor({fm.features}, orthogonal = {str(fm.orthogonal).lower()}, scaling = {fm.scaling}, "
                f"eps = {fm.eps:g}, seed = {fm.seed}, redraw = {fm.redraw})")
    if isinstance(fm, ReluFeatures):
        return (f"relu({fm.features}, orthogonal = {str(fm.orthogonal).lower()}, seed = {fm.seed}, "
                f"redraw = {fm.redraw})")
    return "elu1"


# ------------------------------------------------------------------------------------------------- program
@dataclass(frozen=True)
class ProgramIR:
    """Stages in schedule order; `outputs` names what the op returns.

    When `by_heads` is true the stages carry head ranges that tile `[0, num_heads)` and the op returns their
    outputs concatenated over heads (`outputs` lists them in head order).
    `params` are the learned tensors (`param p[length]`) as (name, length) pairs; `tables` the learned bias
    tables (`param t[heads, width]`) as (name, heads, width).
    """
    name: str = field(compare=False)
    stages: tuple[Stage, ...]
    outputs: tuple[str, ...]
    params: tuple[tuple[str, int], ...] = ()
    by_heads: bool = False
    bindings: tuple[tuple[str, object], ...] = field(default=(), compare=False)
    tables: tuple[tuple[str, int, int], ...] = ()

    @property
    def num_heads(self) -> int | None:
        """The head count a per-head program needs, or None if any count works."""
        return max(s.heads[1] for s in self.stages) if self.by_heads else None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def graph(self):
        """The dataflow graph (`networkx.DiGraph`): nodes are `input`, params and stages; edges carry tensors
        and are labelled with the role (`query`, `keys`, `packed`)."""
        import networkx as nx
        g = nx.DiGraph()
        g.add_node(INPUT, kind="input")
        for name, length in self.params:
            g.add_node(name, kind="param", length=length)
        for s in self.stages:
            g.add_node(s.name, kind="stage", stage=s)
        for s in self.stages:
            roles = [("query", s.query), ("keys", s.keys)]
            if isinstance(s.normaliser, Nested):
                roles.append(("packed", s.normaliser.packed))
            for role, src in roles:
                if g.has_edge(src, s.name):
                    g.edges[src, s.name]["roles"] += (role,)
                else:
                    g.add_edge(src, s.name, roles=(role,))
        return g

    def to_text(self) -> str:
        """A readable listing of the IR (not `.attn` source: the normal form, one stage per line)."""
        lines = [f"program {self.name}"]
        lines += [f"  param {n}[{length}]" for n, length in self.params]
        lines += [f"  param {n}[{h}, {w}]" for n, h, w in self.tables]
        lines += ["  " + s.describe() for s in self.stages]
        lines.append(f"  return {', '.join(self.outputs)}" + (" (concatenated over heads)" if self.by_heads else ""))
        return "\n".join(lines)
