"""Lowerings: the ways a backend can run a stage, declared by the backends and read by the planner.

A `Lowering` names one way to run a kind of stage (`softmax`, `linear`, `nested`) on one backend: whether
it applies to a `Problem` (a stage at given shapes, dtype, device; `None` or why not), the `Work` it does
there in the cost model's terms (counts per calibrated constant: score elements, masked elements, bytes
moved, calls, one-time compiles), and how to run it. Backends declare their lowerings when the backends
package is loaded (`patterndsl.backends.declare_all`); this module never imports a backend. The cost model
(`model.py`) turns work into predicted seconds and `select.py` picks the cheapest lowering that applies.

>>> from patterndsl.ir.mask import sliding
>>> from patterndsl.ir.program import Softmax, Stage
>>> p = Problem(Stage("out", Softmax(), sliding(4)), 1, 4, 1000, 1000, 64, 64)
>>> p.kind, p.shape_class()[2:6]
('softmax', (10, 10, False, False))
>>> Work.of({"flash.256": 2e6, "call": 3}).counts
(('call', 3.0), ('flash.256', 2000000.0))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..ir.program import Linear, Softmax, Stage

KINDS = ("softmax", "linear", "nested")


def stage_kind(stage: Stage) -> str:
    if isinstance(stage.normaliser, Softmax):
        return "softmax"
    return "linear" if isinstance(stage.normaliser, Linear) else "nested"


def bucket(n: int) -> int:
    """The shape-class bucket of a length: lengths in (2^(b-1), 2^b] share bucket b."""
    return max(int(n) - 1, 0).bit_length()


def offset_class(q_offset: int) -> int:
    """The shape-class bucket of a query offset: 0 for none, else its length bucket plus one (a lowering's
    applicability may depend on whether there is an offset, never on its exact value)."""
    return 0 if not q_offset else bucket(q_offset) + 1


@dataclass(frozen=True)
class Problem:
    """A stage at one call's shapes: what a lowering is asked to run."""
    stage: Stage
    batch: int
    heads: int
    n_q: int
    n_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    padded: bool = False        # a key padding mask is given
    grad: bool = False          # a backward will run
    packed: int = 0             # nested stages: the packed length l
    kv_heads: int = 0           # heads of k and v (grouped-query attention); 0: as many as the queries
    q_offset: int = 0           # query row r is at position q_offset + r (one int: per-batch offsets run apart)

    @property
    def h_kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def groups(self) -> int:
        """Query heads per kv head."""
        return max(self.heads // max(self.h_kv, 1), 1)

    @property
    def kind(self) -> str:
        return stage_kind(self.stage)

    @property
    def bh(self) -> int:
        return self.batch * self.heads

    @property
    def elt(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def shape_class(self) -> tuple:
        """Problems of one class share a plan: lengths and query offsets by power-of-two bucket (and whether
        lengths are multiples of 128, which some lowerings need), everything else exact."""
        return (self.batch, self.heads, bucket(self.n_q), bucket(self.n_k), self.n_q % 128 == 0,
                self.n_k % 128 == 0, self.head_dim, self.head_dim_v, self.dtype, self.device, self.padded,
                self.grad, self.packed, self.h_kv, offset_class(self.q_offset))


@dataclass(frozen=True)
class Work:
    """What a lowering does: (term, amount) pairs per call, and one-time terms (compiles), for `model.py`."""
    counts: tuple[tuple[str, float], ...]
    once: tuple[tuple[str, float], ...] = ()
    note: str = ""

    @staticmethod
    def of(counts: dict, once: dict | None = None, note: str = "") -> "Work":
        def tidy(d):
            merged: dict[str, float] = {}
            for k, v in d.items():
                merged[k] = merged.get(k, 0.0) + float(v)
            return tuple(sorted((k, v) for k, v in merged.items() if v))
        return Work(tidy(counts), tidy(once or {}), note)

    def __add__(self, other: "Work") -> "Work":
        counts, once = dict(self.counts), dict(self.once)
        for k, v in other.counts:
            counts[k] = counts.get(k, 0.0) + v
        for k, v in other.once:
            once[k] = once.get(k, 0.0) + v
        return Work.of(counts, once, "; ".join(n for n in (self.note, other.note) if n))

    def term(self, name: str) -> float:
        return dict(self.counts).get(name, 0.0)


@dataclass(frozen=True)
class Lowering:
    """One way to run a kind of stage on a backend (see the module docstring).

    `run` has the backend method's signature for its kind: `run(stage, q, k, v, *, scale, key_padding_mask,
    runtime, q_offset)` (softmax), `(..., *, projection, key_padding_mask, q_offset)` (linear),
    `(..., *, p, c, key_padding_mask, q_offset)` (nested); k, v may have fewer heads than q (grouped-query
    attention) and `q_offset` is one int (per-batch offsets are run one offset at a time by the op).
    A lowering that cannot serve grouped heads or an offset says so in `applies`. `last_resort` lowerings (the reference) are chosen by `auto` only when nothing else applies.
    `ready(problem)` says whether its one-time cost (a compile) is already paid in this process;
    `any_length` whether it runs when torch.compile traces it with symbolic lengths; `explicit(problem)`
    gives why `auto` must not take it there (None: it may), e.g. Triton's CPU interpreter.
    `bind(stage, q, k, v, scale, padded, q_offset)` (softmax, optional) returns a callable
    `(q, k, v, key_padding_mask) -> out` for every call with these tensors' shapes, dtypes and devices, padding
    or not, and this offset, with what depends only on those done once (the op's fast path), or None.
    """
    name: str
    backend: str
    kinds: tuple[str, ...]
    summary: str
    applies: Callable[[Problem], str | None]
    work: Callable[[Problem], Work]
    run: Callable
    last_resort: bool = False
    ready: Callable[[Problem], bool] | None = None
    any_length: bool = True
    explicit: Callable[[Problem], str | None] | None = None
    bind: Callable | None = None

    def __repr__(self) -> str:
        return f"<Lowering {self.name}>"


_DECLARED: dict[str, Lowering] = {}


def declare(lowering: Lowering) -> Lowering:
    """Register a lowering (backends call this when loaded; a second declaration replaces the first)."""
    _DECLARED[lowering.name] = lowering
    return lowering


def declared(kind: str | None = None, backend: str | None = None) -> list[Lowering]:
    """Declared lowerings, in declaration order, optionally of one kind and one backend."""
    return [lw for lw in _DECLARED.values()
            if (kind is None or kind in lw.kinds) and (backend is None or lw.backend == backend)]


def lowering(name: str) -> Lowering:
    """The declared lowering called `name` (KeyError with the known names otherwise)."""
    try:
        return _DECLARED[name]
    except KeyError:
        raise KeyError(f"no lowering '{name}'; declared: {', '.join(_DECLARED)}") from None
