"""The mask protocol: what each node of the mask algebra defines, so that a primitive lives in one module.

A mask says which (query position i, key position j) pairs interact. Every node class carries all its
meanings; the rest of the compiler asks the node instead of switching on its type:

- `problems()`: broken invariants of its fields (the IR verifier raises on the first one);
- `source()`: `.attn` text; `label()`: a compact spelling for picture titles (default: the source);
- `at(i, j, ops)`: its pointwise semantics, written once against an `ops` object (below), so the same
  definition gives dense torch masks, masks at gathered indices, FlexAttention `mask_mod` bodies and
  Triton source text;
- `classify(tiles, a, b)` and `candidates(tiles)`: closed-form tile classes and a superset of the nonempty
  tiles on a grid (`tiles` is a `Tiles` view, see below);
- `pairs(n)`: allowed pairs of an n x n mask, as an expression in the sympy symbol n;
- `union_all(nodes)` / `inter_all(nodes)`: how nodes of this class merge inside a union / intersection
  (the normal form), and `runtime_names()`: names of runtime tensors it reads;
- `retained(t)`: the keys some query at a position >= t may still see (a `Keep`), from the closed form: what a
  decode cache must hold once the queries before t are done (a window keeps its last keys, `cols` its columns).

Only `at`, `source` and the fields are required: the defaults classify every tile as partial and uncertain
(the planner then settles tiles by evaluating `at`), enumerate every tile, count n^2 pairs, and retain
every key.

**ops.** `i` is the absolute query position (row r of a call with query offset o is at o + r), `j` the
key position. Arithmetic and logic follow `ir/predicate.py` (`const`, `bin`, `call`, `cmp`, `logic`: Python
integer semantics, `x // 0 == x % 0 == 0`); data that lives outside the IR is reached through three more:
`ops.member(x, idx, side)` (x is in the index set idx; side "q" or "k"), `ops.lookup(node, row, value)`
(value is in row `row` of `node.table(n_q, n_k)`, a `[rows, node.width]` integer table padded with -1,
where n_q counts absolute query rows) and `ops.ids(name, side, x)` (the runtime id of position x).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2   # tile classes: no pair allowed, some, all


def classes(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """int8 tile classes from bool tensors `full` and `empty` (full wins)."""
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


def sure(cls) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, unsure) for a class the closed form knows exactly."""
    return torch.as_tensor(cls, dtype=torch.int8), torch.zeros((), dtype=torch.bool)


def ranges_to_pairs(owner: torch.Tensor, start: torch.Tensor, end: torch.Tensor):
    """Expand ranges: for each k, the pairs (owner[k], x) with x in [start[k], end[k]). Ordered by k, then x."""
    count = (end - start).clamp(min=0)
    rep = torch.repeat_interleave(torch.arange(owner.numel()), count)
    offset = torch.cumsum(count, 0) - count
    x = start[rep] + torch.arange(rep.numel()) - offset[rep]
    return owner[rep], x


def no_tiles():
    """The empty candidate list."""
    none = torch.zeros(0, dtype=torch.long)
    return none, none


@dataclass(frozen=True)
class Keep:
    """Key positions that may still be seen: every `j >= start` (None: no such suffix) and the positions in
    `extra`. `Keep(0)` keeps every key, `Keep(None)` none.

    >>> (Keep(10) | Keep(None, frozenset({0, 12}))) == Keep(10, frozenset({0}))
    True
    >>> Keep(10, frozenset({0})) & Keep(4) == Keep(10)
    True
    """
    start: int | None
    extra: frozenset = frozenset()

    def __post_init__(self):
        if self.start is not None and any(x >= self.start for x in self.extra):
            object.__setattr__(self, "extra", frozenset(x for x in self.extra if x < self.start))

    def __or__(self, other: "Keep") -> "Keep":
        starts = [s for s in (self.start, other.start) if s is not None]
        return Keep(min(starts) if starts else None, self.extra | other.extra)

    def __and__(self, other: "Keep") -> "Keep":
        def above(xs, start):
            return frozenset() if start is None else frozenset(x for x in xs if x >= start)
        start = None if self.start is None or other.start is None else max(self.start, other.start)
        return Keep(start, (self.extra & other.extra) | above(self.extra, other.start) | above(other.extra, self.start))

    def holds(self, positions: torch.Tensor) -> torch.Tensor:
        """bool, like `positions`: which of these key positions are kept."""
        out = positions >= self.start if self.start is not None else torch.zeros_like(positions, dtype=torch.bool)
        if self.extra:
            out = out | torch.isin(positions, torch.tensor(sorted(self.extra), device=positions.device))
        return out

    def first(self) -> int | None:
        """The smallest kept position (None: none is kept)."""
        xs = ([self.start] if self.start is not None else []) + list(self.extra)
        return min(xs) if xs else None


KEEP_ALL = Keep(0)


@dataclass(frozen=True)
class Builder:
    """How the language's `name(args)` builds a primitive: `make(**values)` once the arguments are checked.
    `at_least` maps int arguments to (lowest value, their name in messages or None); `indices` names set
    arguments holding token indices (each >= 0)."""
    make: Callable
    at_least: dict = field(default_factory=dict)
    indices: tuple = ()


class Tiles:
    """What a mask classifies against: a grid and the call's runtime ids, with a cache for derived data.

    `grid` is duck-typed: `n_q` (query rows), `n_k`, `bm`, `bn`, `nqb`, `nkb`, `q_offset`, and
    `row_bounds(a)` / `col_bounds(b)` giving the first and last absolute position of query tiles `a` and
    key tiles `b` (query tile a holds rows a*bm ..., at positions q_offset + row).
    """

    def __init__(self, grid, runtime: dict | None = None):
        self.grid, self.runtime, self._cache = grid, runtime, {}

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def members(self, idx: frozenset, side: str) -> torch.Tensor:
        """Sorted absolute positions of `idx` inside the grid's rows (side "q") or keys (side "k")."""
        g = self.grid
        lo, hi = (g.q_offset, g.q_offset + g.n_q) if side == "q" else (0, g.n_k)
        return self.cached((idx, side), lambda: torch.tensor(sorted(x for x in idx if lo <= x < hi),
                                                             dtype=torch.long))


class Mask:
    """Base class: masks combine with `|`, `&`, `~` and `-` like the language; see the module docstring."""

    def __or__(self, other: "Mask") -> "Mask":
        from .logic import union
        return union(self, other)

    def __and__(self, other: "Mask") -> "Mask":
        from .logic import inter
        return inter(self, other)

    def __invert__(self) -> "Mask":
        from .logic import complement
        return complement(self)

    def __sub__(self, other: "Mask") -> "Mask":
        from .logic import complement, inter
        return inter(self, complement(other))

    def sort_key(self) -> str:
        return repr(self)

    @property
    def children(self) -> tuple:
        return ()

    # ------------------------------------------------------------------------------------- the protocol
    def source(self) -> str:
        raise NotImplementedError(type(self).__name__)

    def label(self) -> str:
        return self.source()

    def problems(self):
        return ()

    def at(self, i, j, ops):
        raise NotImplementedError(type(self).__name__)

    def classify(self, tiles: Tiles, a, b):
        return torch.tensor(PARTIAL, dtype=torch.int8), torch.ones((), dtype=torch.bool)

    def candidates(self, tiles: Tiles):
        return None

    def pairs(self, n):
        return n ** 2

    def pairs_with(self, other: "Mask", n):
        """Pairs of `self & other` in closed form where this node knows one, else None (see `Inter.pairs`)."""
        return None

    def runtime_names(self) -> tuple[str, ...]:
        return ()

    def retained(self, t: int) -> Keep:
        return KEEP_ALL

    @classmethod
    def union_all(cls, nodes: list) -> list:
        return nodes

    @classmethod
    def inter_all(cls, nodes: list) -> list:
        return nodes
