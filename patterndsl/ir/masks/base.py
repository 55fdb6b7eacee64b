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
  (the normal form), and `runtime_names()`: names of runtime tensors it reads.

Only `at`, `source` and the fields are required: the defaults classify every tile as partial and uncertain
(the planner then settles tiles by evaluating `at`), enumerate every tile, and count n^2 pairs.

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

    def runtime_names(self) -> tuple[str, ...]:
        return ()

    @classmethod
    def union_all(cls, nodes: list) -> list:
        return nodes

    @classmethod
    def inter_all(cls, nodes: list) -> list:
        return nodes
