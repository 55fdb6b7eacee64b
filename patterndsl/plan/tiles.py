"""Tile grids and the sparse block layout (`TileLayout`, a CSR over query tiles) the backends walk.

A `TileLayout` lists, for every query tile `a`, the nonempty key tiles `col_idx[row_ptr[a]:row_ptr[a + 1]]`
(ascending) and their classes `cls` (1 partial, 2 full). Its format, as code that rebuilds the dense grid:

    dense = torch.zeros(nqb, nkb, dtype=torch.int8)
    for a in range(nqb):
        for t in range(row_ptr[a], row_ptr[a + 1]):
            dense[a, col_idx[t]] = cls[t]

>>> from patterndsl.plan.layout import tile_layout
>>> from patterndsl.ir.mask import sliding
>>> print(tile_layout(sliding(4), 16, 16, 4, 4))
TileLayout 16x16 in 4x4 tiles: 10 of 16 nonempty (62.5%), 6 partial
  #+..
  +#+.
  .+#+
  ..+#
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.masks.base import ranges_to_pairs  # noqa: F401  (the planner's helper, defined with the masks)


@dataclass(frozen=True)
class Grid:
    """An `n_q x n_k` problem cut into `bm x bn` tiles (the last row/column of tiles may be ragged); query row r
    is at absolute position `q_offset + r`."""
    n_q: int
    n_k: int
    bm: int
    bn: int
    q_offset: int = 0

    @property
    def nqb(self) -> int:
        return -(-self.n_q // self.bm)

    @property
    def nkb(self) -> int:
        return -(-self.n_k // self.bn)

    def row_bounds(self, a: torch.Tensor):
        """First and last (inclusive) absolute query position of query tiles `a`."""
        return a * self.bm + self.q_offset, torch.clamp((a + 1) * self.bm, max=self.n_q) - 1 + self.q_offset

    def col_bounds(self, b: torch.Tensor):
        """First and last (inclusive) key index of key tiles `b`."""
        return b * self.bn, torch.clamp((b + 1) * self.bn, max=self.n_k) - 1


@dataclass(frozen=True)
class TileLayout:
    """The nonempty tiles of a mask per query tile (see the module docstring for the format)."""
    n_q: int
    n_k: int
    block_m: int
    block_n: int
    row_ptr: torch.Tensor   # int64 [nqb + 1]
    col_idx: torch.Tensor   # int64 [nnz], ascending within a row
    cls: torch.Tensor       # int8 [nnz]: 1 partial, 2 full
    q_offset: int = 0       # query row r is at absolute position q_offset + r

    @staticmethod
    def from_sorted(g: Grid, a: torch.Tensor, b: torch.Tensor, cls: torch.Tensor) -> "TileLayout":
        """From nonempty tiles (a, b) sorted by a, then b."""
        row_ptr = torch.zeros(g.nqb + 1, dtype=torch.long)
        row_ptr[1:] = torch.cumsum(torch.bincount(a, minlength=g.nqb), 0)
        return TileLayout(g.n_q, g.n_k, g.bm, g.bn, row_ptr, b.long(), cls.to(torch.int8), g.q_offset)

    @property
    def grid(self) -> Grid:
        return Grid(self.n_q, self.n_k, self.block_m, self.block_n, self.q_offset)

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.nqb, self.grid.nkb

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    def row_ids(self) -> torch.Tensor:
        """The query tile of every listed tile, int64 [nnz]."""
        return torch.repeat_interleave(torch.arange(self.shape[0]), self.row_ptr.diff())

    def dense(self) -> torch.Tensor:
        """The dense int8 grid `[nqb, nkb]`."""
        out = torch.zeros(self.shape, dtype=torch.int8)
        out[self.row_ids(), self.col_idx] = self.cls
        return out

    def transpose(self) -> "TileLayout":
        """The layout of the transposed mask: per key tile, its nonempty query tiles (as tile lists; the
        transposed grid has no query offset)."""
        a = self.row_ids()
        order = torch.argsort(self.col_idx * self.shape[0] + a)
        g = Grid(self.n_k, self.n_q, self.block_n, self.block_m)
        return TileLayout.from_sorted(g, self.col_idx[order], a[order], self.cls[order])

    def __str__(self) -> str:
        nqb, nkb = self.shape
        total = max(nqb * nkb, 1)
        partial = int((self.cls == 1).sum())
        head = (f"TileLayout {self.n_q}x{self.n_k} in {self.block_m}x{self.block_n} tiles: {self.nnz} of "
                f"{nqb * nkb} nonempty ({self.nnz / total:.1%}), {partial} partial"
                + (f", queries from position {self.q_offset}" if self.q_offset else ""))
        if nqb > 64 or nkb > 64:
            return head
        rows = ["  " + "".join(".+#"[c] for c in r) for r in self.dense().tolist()]
        return "\n".join([head] + rows)
