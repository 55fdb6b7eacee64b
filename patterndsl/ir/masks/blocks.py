"""Blocks: `i // size == j // size`, a block-diagonal mask (local attention in fixed, non-overlapping blocks).

A tile is full when its rows and keys all sit in one block, empty when their block ranges do not meet; the key
tiles of a query tile are one range (the blocks its rows touch).

>>> blocks(4).source(), blocks(1) == sliding(0)
('blocks(4)', True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .band import _tile_span, band, sliding  # noqa: F401  (sliding: the doctest)
from .base import Builder, Keep, Mask, classes, ranges_to_pairs, sure


@dataclass(frozen=True, repr=True)
class Blocks(Mask):
    """`i // size == j // size`: block-diagonal."""
    size: int

    def problems(self):
        if self.size < 2:
            yield f"blocks({self.size}) not folded"

    def source(self) -> str:
        return f"blocks({self.size})"

    def at(self, i, j, ops):
        s = ops.const(self.size)
        return ops.cmp("==", ops.bin("//", i, s), ops.bin("//", j, s))

    def classify(self, tiles, a, b):
        (r0, r1), (c0, c1) = tiles.grid.row_bounds(a), tiles.grid.col_bounds(b)
        qa, qb, ka, kb = r0 // self.size, r1 // self.size, c0 // self.size, c1 // self.size
        return sure(classes((qa == qb) & (ka == kb) & (qa == ka), (qb < ka) | (kb < qa)))

    def candidates(self, tiles):
        g = tiles.grid
        all_rows = torch.arange(g.nqb)
        r0, r1 = g.row_bounds(all_rows)
        lo_j = (r0 // self.size) * self.size
        hi_j = torch.clamp((r1 // self.size + 1) * self.size - 1, max=g.n_k - 1)
        first, last = _tile_span(lo_j, hi_j, g.n_k, g.bn)
        return ranges_to_pairs(all_rows, first, last + 1)

    def pairs(self, n):
        return self.size * n

    def retained(self, t: int) -> Keep:
        """Queries i >= t see only their own block: keys from the start of t's block on."""
        return Keep(t // self.size * self.size)


def blocks(size: int) -> Mask:
    return band(0, 0) if size == 1 else Blocks(size)


BUILDERS = {"blocks": Builder(blocks, {"size": (1, "block size")})}
