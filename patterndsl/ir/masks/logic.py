"""Constants and combinators: `full`, `empty`, union `|`, intersection `&`, complement `~`, and their normal form.

The smart constructors `union`, `inter` and `complement` flatten, sort, deduplicate and fold constants, and let
each primitive class merge its own nodes (`union_all` / `inter_all`: bands meet in closed form, index sets
unite), so equal patterns written differently get equal, hashable values (used as cache keys).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import EMPTY as _EMPTY_TILE
from .base import FULL as _FULL_TILE
from .base import PARTIAL, Keep, Mask, classes, no_tiles, sure


@dataclass(frozen=True, repr=True)
class Full(Mask):
    """Every pair."""

    def source(self) -> str:
        return "full"

    def at(self, i, j, ops):
        return ops.const(True)

    def classify(self, tiles, a, b):
        return sure(_FULL_TILE)


@dataclass(frozen=True, repr=True)
class Empty(Mask):
    """No pair."""

    def source(self) -> str:
        return "empty"

    def at(self, i, j, ops):
        return ops.const(False)

    def classify(self, tiles, a, b):
        return sure(_EMPTY_TILE)

    def retained(self, t: int) -> Keep:
        return Keep(None)

    def candidates(self, tiles):
        return no_tiles()

    def pairs(self, n):
        return n * 0


FULL, EMPTY = Full(), Empty()


class _Combined(Mask):
    """Shared by Union and Inter: `parts`, sorted and of at least two masks."""
    word = ""

    @property
    def children(self) -> tuple:
        return self.parts

    def problems(self):
        if len(self.parts) < 2:
            yield f"{type(self).__name__} of fewer than two parts"
        if list(self.parts) != sorted(self.parts, key=lambda p: p.sort_key()):
            yield "parts not sorted"

    def at(self, i, j, ops):
        out = self.parts[0].at(i, j, ops)
        for p in self.parts[1:]:
            out = ops.logic(self.word, out, p.at(i, j, ops))
        return out

    def retained(self, t: int) -> Keep:
        """A key may be seen by the union if by a part; by the intersection only if by every part."""
        out = self.parts[0].retained(t)
        for p in self.parts[1:]:
            out = (out | p.retained(t)) if self.word == "or" else (out & p.retained(t))
        return out

    def classify(self, tiles, a, b):
        parts = [p.classify(tiles, a, b) for p in self.parts]
        cls = torch.stack(torch.broadcast_tensors(*[c for c, _ in parts]))
        unsure = torch.stack(torch.broadcast_tensors(*[u for _, u in parts])).any(0)
        if self.word == "or":
            out = classes((cls == _FULL_TILE).any(0), (cls == _EMPTY_TILE).all(0))
        else:
            out = classes((cls == _FULL_TILE).all(0), (cls == _EMPTY_TILE).any(0))
        several = (cls == PARTIAL).sum(0) > 1      # e.g. two partial parts whose union is full
        return out, (unsure | several) & (out == PARTIAL)


@dataclass(frozen=True, repr=True)
class Union(_Combined):
    """Pairs allowed by any part."""
    parts: tuple
    word = "or"

    def source(self) -> str:
        return " | ".join(f"({p.source()})" if isinstance(p, Union) else p.source() for p in self.parts)

    def label(self) -> str:
        from .index import global_label
        rest, names = global_label(self.parts)
        return " | ".join([p.label() for p in rest] + names)

    def candidates(self, tiles):
        parts = [p.candidates(tiles) for p in self.parts]
        if any(p is None for p in parts):
            return None
        nkb = tiles.grid.nkb
        lin = torch.unique(torch.cat([a * nkb + b for a, b in parts]))
        return lin // nkb, lin % nkb

    def pairs(self, n):  # a sum: an upper bound, exact when the parts are disjoint to first order
        import sympy
        total = sympy.Add(*[p.pairs(n) for p in self.parts])
        return n ** 2 if sympy.degree(total, n) > 2 or total.subs(n, 1 << 20) > (1 << 40) else total


@dataclass(frozen=True, repr=True)
class Inter(_Combined):
    """Pairs allowed by every part."""
    parts: tuple
    word = "and"

    def source(self) -> str:
        return " & ".join(f"({p.source()})" if isinstance(p, (Union, Inter)) else p.source() for p in self.parts)

    def label(self) -> str:
        return " & ".join(f"({p.label()})" if isinstance(p, Union) else p.label() for p in self.parts)

    def candidates(self, tiles):
        """The candidates of the sparsest part that has any, by pair count at this size: only that part's
        tiles are enumerated (`causal & random(...)` at 1M tokens never lists the causal half)."""
        import sympy
        n, size = sympy.Symbol("N", positive=True), max(tiles.grid.n_q, tiles.grid.n_k, 1)
        for part in sorted(self.parts, key=lambda p: float(p.pairs(n).subs(n, size))):
            found = part.candidates(tiles)
            if found is not None:
                return found
        return None

    def pairs(self, n):
        """Bounded by its sparsest part; tighter where a closed form exists: an intersection with a union
        distributes over it (`causal & (sliding(w) | global(S))` counts `window(w, 0)`, `causal & cols(S)` and
        `causal & rows(S)`, a sum as in `Union.pairs`) and two parts may know their common pairs
        (`Mask.pairs_with`: a band with an index set)."""
        import sympy

        def big(e):
            return float(sympy.sympify(e).subs(n, 1 << 20))
        bound = min((p.pairs(n) for p in self.parts), key=big)
        found = self._split_pairs(n)
        return bound if found is None or big(found) > big(bound) else sympy.sympify(found)

    def _split_pairs(self, n):
        for k, part in enumerate(self.parts):
            if isinstance(part, Union):
                rest = self.parts[:k] + self.parts[k + 1:]
                return Union(tuple(inter(*rest, p) for p in part.parts)).pairs(n)
        if len(self.parts) == 2:
            a, b = self.parts
            found = a.pairs_with(b, n)
            return found if found is not None else b.pairs_with(a, n)
        return None


@dataclass(frozen=True, repr=True)
class Not(Mask):
    """Pairs the part does not allow."""
    part: Mask

    @property
    def children(self) -> tuple:
        return (self.part,)

    def source(self) -> str:
        inner = self.part.source()
        return f"~({inner})" if isinstance(self.part, (Union, Inter)) else f"~{inner}"

    def label(self) -> str:
        inner = self.part.label()
        return f"~({inner})" if isinstance(self.part, (Union, Inter)) else f"~{inner}"

    def at(self, i, j, ops):
        return ops.logic("not", self.part.at(i, j, ops))

    def classify(self, tiles, a, b):
        cls, unsure = self.part.classify(tiles, a, b)
        return (_FULL_TILE - cls).to(torch.int8), unsure


# ------------------------------------------------------------------------------------------- constructors
def _flatten(kind, parts) -> list:
    out = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return out


def _merged(parts: list, how: str) -> list:
    """Parts with each class's nodes merged by that class (`union_all` or `inter_all`)."""
    groups: dict = {}
    for p in parts:
        groups.setdefault(type(p), []).append(p)
    out = []
    for kind, nodes in groups.items():
        out += getattr(kind, how)(nodes)
    return out


def _canon(kind, parts: list) -> Mask:
    uniq = sorted(set(parts), key=lambda m: m.sort_key())
    if not uniq:
        return FULL if kind is Inter else EMPTY
    return uniq[0] if len(uniq) == 1 else kind(tuple(uniq))


def union(*parts: Mask) -> Mask:
    """`a | b | ...` in normal form (bands that form one band merge; row/col sets unite)."""
    flat = [p for p in _flatten(Union, parts) if not isinstance(p, Empty)]
    if any(isinstance(p, Full) for p in flat):
        return FULL
    flat = [p for p in _merged(flat, "union_all") if not isinstance(p, Empty)]
    uniq = set(flat)
    if FULL in uniq or any(Not(p) in uniq for p in uniq):
        return FULL
    return _canon(Union, flat)


def inter(*parts: Mask) -> Mask:
    """`a & b & ...` in normal form (bands intersect in closed form; row/col sets intersect)."""
    flat = [p for p in _flatten(Inter, parts) if not isinstance(p, Full)]
    if any(isinstance(p, Empty) for p in flat):
        return EMPTY
    flat = [p for p in _merged(flat, "inter_all") if not isinstance(p, Full)]
    uniq = set(flat)
    if EMPTY in uniq or any(Not(p) in uniq for p in uniq):
        return EMPTY
    return _canon(Inter, flat)


def complement(m: Mask) -> Mask:
    """`~m` in normal form."""
    if isinstance(m, Full):
        return EMPTY
    if isinstance(m, Empty):
        return FULL
    if isinstance(m, Not):
        return m.part
    return Not(m)


def difference(a: Mask, b: Mask) -> Mask:
    """`a - b`: pairs in a and not in b."""
    return inter(a, complement(b))


# ------------------------------------------------------------------------------------------------ queries
def walk(m: Mask):
    """Every node of a mask, parents first."""
    stack = [m]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def runtime_inputs(m: Mask) -> tuple[str, ...]:
    """Names of the runtime tensors a mask reads (`same(ids)`)."""
    return tuple(sorted({name for node in walk(m) for name in node.runtime_names()}))
