"""Index sets: `rows(S)` (`i in S`), `cols(S)` (`j in S`) and `global(S)` (`rows(S) | cols(S)`).

These queries see every key (rows), or every query sees these keys (cols): Longformer's and BigBird's global
tokens. Tiles are classified by counting the members that fall in each tile; the nonempty tiles are whole tile
rows (or columns). Kernels read a set as one 0/1 flag per query (or key) through `ops.member`.

>>> global_({0}) == Rows(frozenset({0})) | Cols(frozenset({0}))
True
>>> (rows(range(4, 9)) | cols({2})).label()  # unions list their parts in a canonical order
'cols({2}) | rows(range(4, 9))'
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KEEP_ALL, Builder, Keep, Mask, classes, sure
from .logic import EMPTY, union


class _Index(Mask):
    """Shared by Rows and Cols: `idx` on one side ("q" or "k")."""
    side = ""
    word = ""

    def problems(self):
        if not self.idx or min(self.idx) < 0:
            yield f"bad index set in {self}"

    def source(self) -> str:
        idx = sorted(self.idx)
        if len(idx) > 3 and idx[-1] - idx[0] + 1 == len(idx):
            return f"{self.word}(range({idx[0]}, {idx[-1] + 1}))"
        return f"{self.word}({{{', '.join(map(str, idx))}}})"

    def label(self) -> str:
        return f"{self.word}({short_set(self.idx)})"

    def at(self, i, j, ops):
        return ops.member(i if self.side == "q" else j, self.idx, self.side)

    def _tile_of(self, tiles, members):
        g = tiles.grid
        return (members - g.q_offset) // g.bm if self.side == "q" else members // g.bn

    def classify(self, tiles, a, b):
        g = tiles.grid
        rows = self.side == "q"
        nb, t = (g.nqb, a) if rows else (g.nkb, b)
        count = torch.bincount(self._tile_of(tiles, tiles.members(self.idx, self.side)), minlength=nb)[t]
        first, last = g.row_bounds(t) if rows else g.col_bounds(t)
        return sure(classes(count == last - first + 1, count == 0))

    def candidates(self, tiles):
        g = tiles.grid
        hit = torch.unique(self._tile_of(tiles, tiles.members(self.idx, self.side)))
        if self.side == "q":
            return hit.repeat_interleave(g.nkb), torch.arange(g.nkb).repeat(hit.numel())
        return torch.arange(g.nqb).repeat_interleave(hit.numel()), hit.repeat(g.nqb)

    def pairs(self, n):
        return len(self.idx) * n

    def pairs_with(self, other, n):
        """With the other side's index set: |S| |T|. With a band: each member's row (or column) meets it in a
        range of offsets i - j, a constant count or N minus one once N passes the members and the band's bounds
        (`causal & rows(S)`: i + 1 per row i; `causal & cols(S)`: N - j per column j); None for a dilated band
        that N cuts."""
        from .band import Band
        if isinstance(other, _Index) and other.side != self.side:
            return len(self.idx) * len(other.idx)
        if not isinstance(other, Band):
            return None
        s, rows = other.step, self.side == "q"
        if (other.lo if rows else other.hi) is None and s > 1:
            return None
        total = 0
        for x in self.idx:          # row i: offsets in [i - N + 1, i]; column j: offsets in [-j, N - 1 - j]
            if rows:
                lo, hi = other.lo, x if other.hi is None else min(other.hi, x)
                unbounded = lo is None
            else:
                lo, hi = -x if other.lo is None else max(other.lo, -x), other.hi
                unbounded = hi is None
            if unbounded:
                total += n - x + hi if rows else n - x - lo
            else:
                total += max(0, hi // s - (-(-lo // s)) + 1)
        return total

    def retained(self, t: int) -> Keep:
        """`cols(S)` keeps the keys in S; `rows(S)` every key while a row of S is still to come, then none."""
        if self.side == "k":
            return Keep(None, self.idx)
        return KEEP_ALL if max(self.idx) >= t else Keep(None)

    @classmethod
    def union_all(cls, nodes: list) -> list:
        return [cls(frozenset().union(*(p.idx for p in nodes)))]

    @classmethod
    def inter_all(cls, nodes: list) -> list:
        common = frozenset.intersection(*(p.idx for p in nodes))
        return [cls(common)] if common else [EMPTY]


@dataclass(frozen=True, repr=True)
class Rows(_Index):
    """`i in idx`: these queries see every key (the row half of `global`)."""
    idx: frozenset
    side = "q"
    word = "rows"


@dataclass(frozen=True, repr=True)
class Cols(_Index):
    """`j in idx`: every query sees these keys (the column half of `global`)."""
    idx: frozenset
    side = "k"
    word = "cols"


def global_(idx) -> Mask:
    idx = frozenset(idx)
    return union(Rows(idx), Cols(idx)) if idx else EMPTY


def rows(idx) -> Mask:
    idx = frozenset(idx)
    return Rows(idx) if idx else EMPTY


def cols(idx) -> Mask:
    idx = frozenset(idx)
    return Cols(idx) if idx else EMPTY


BUILDERS = {
    "global": Builder(global_, indices=("tokens",)),
    "rows": Builder(rows, indices=("tokens",)),
    "cols": Builder(cols, indices=("tokens",)),
}


def short_set(idx: frozenset) -> str:
    """`range(a, b)` for a run of more than two, else the first four members."""
    items = sorted(idx)
    if len(items) > 2 and items[-1] - items[0] == len(items) - 1:
        return f"range({items[0]}, {items[-1] + 1})"
    return "{" + ", ".join(map(str, items[:4])) + (", ..." if len(items) > 4 else "") + "}"


def global_label(parts) -> tuple[list, list[str]]:
    """For a union's label: its parts without a `rows(S)` and `cols(S)` pair, and `global(S)` for the pair."""
    rows_ = [p for p in parts if isinstance(p, Rows)]
    cols_ = [p for p in parts if isinstance(p, Cols)]
    if rows_ and cols_ and rows_[0].idx == cols_[0].idx:
        return [p for p in parts if p not in (rows_[0], cols_[0])], [f"global({short_set(rows_[0].idx)})"]
    return list(parts), []
