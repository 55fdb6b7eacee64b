"""Random blocks (BigBird): `count` key blocks of `block` keys per query block of `block` queries, seeded.

The draw depends on the seed and the sizes (absolute query rows, keys), is reproducible, and is made by
`random_blocks`, the one definition every evaluator, layout and kernel reads (through `ops.lookup` and
`table`). Tiles are classified by counting drawn (query block, key block) pairs inside each tile.

>>> random_blocks(2, 4, 0, 12, 16).shape
torch.Size([3, 2])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Builder, Mask, classes, ranges_to_pairs, sure
from .logic import EMPTY


@dataclass(frozen=True, repr=True)
class Random(Mask):
    """`count` key blocks of `block` keys per query block of `block` queries, drawn by `random_blocks`."""
    count: int
    block: int
    seed: int

    def problems(self):
        if not (self.count >= 1 and self.block >= 1):
            yield f"bad {self}"

    def source(self) -> str:
        return f"random({self.count}, {self.block}, {self.seed})"

    def label(self) -> str:
        return f"random({self.count}, {self.block})"

    @property
    def width(self) -> int:
        """Columns of `table`."""
        return self.count

    def table(self, n_q: int, n_k: int) -> torch.Tensor:
        """The drawn key blocks of each query block, `[ceil(n_q / block), count]`, -1 where fewer exist."""
        chosen = random_blocks(self.count, self.block, self.seed, n_q, n_k)
        out = torch.full((chosen.shape[0], self.count), -1, dtype=torch.long)
        out[:, :chosen.shape[1]] = chosen
        return out

    def at(self, i, j, ops):
        b = ops.const(self.block)
        return ops.lookup(self, ops.bin("//", i, b), ops.bin("//", j, b))

    def _chosen(self, tiles) -> torch.Tensor:
        g = tiles.grid
        return tiles.cached(self, lambda: random_blocks(self.count, self.block, self.seed, g.q_offset + g.n_q, g.n_k))

    def classify(self, tiles, a, b):
        """Count the drawn (query block, key block) pairs inside each tile's block rectangle."""
        g = tiles.grid
        chosen = self._chosen(tiles)
        (r0, r1), (c0, c1) = g.row_bounds(a), g.col_bounds(b)
        qa, qb = r0 // self.block, r1 // self.block + 1
        ka, kb = c0 // self.block, c1 // self.block + 1
        span = -(-g.bm // self.block) + 1                  # random rows one tile can touch
        rows = qa[..., None] + torch.arange(span)          # [..., span]
        live = rows < qb[..., None]
        picks = chosen[rows.clamp(max=chosen.shape[0] - 1)]              # [..., span, c]
        hit = (picks >= ka[..., None, None]) & (picks < kb[..., None, None]) & live[..., None]
        total = hit.flatten(-2).sum(-1)
        return sure(classes(total == (qb - qa) * (kb - ka), total == 0))

    def candidates(self, tiles):
        g = tiles.grid
        chosen = self._chosen(tiles)                                       # [random rows, c]
        r0, r1 = g.row_bounds(torch.arange(g.nqb))
        a, rr = ranges_to_pairs(torch.arange(g.nqb), r0 // self.block, r1 // self.block + 1)  # (tile, row)
        kb = chosen[rr]                                                    # [P, c] drawn key blocks
        a = a[:, None].expand_as(kb).reshape(-1)
        kb = kb.reshape(-1)
        first = kb * self.block // g.bn
        last = torch.clamp((kb + 1) * self.block, max=g.n_k).sub(1) // g.bn
        a, b = ranges_to_pairs(a, first, last + 1)
        lin = torch.unique(a * g.nkb + b)
        return lin // g.nkb, lin % g.nkb

    def pairs(self, n):
        return self.count * self.block * n


def random_blocks(count: int, block: int, seed: int, n_q: int, n_k: int) -> torch.Tensor:
    """The key blocks of `random(count, block, seed)`: a LongTensor [ceil(n_q/block), min(count, n_kb)].

    Row `a` holds distinct key-block indices drawn uniformly for query block `a` (Floyd's sampling,
    vectorised over query blocks: O(n_qb * count^2), no n_qb x n_kb table), reproducible from the seed and
    the sizes. This one function defines `random` for the reference, the layouts and every backend.
    """
    n_qb, n_kb = -(-n_q // block), -(-n_k // block)
    c = min(count, n_kb)
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.empty(n_qb, 0, dtype=torch.long)
    for t in range(n_kb - c, n_kb):
        x = (torch.rand(n_qb, generator=g, dtype=torch.float64) * (t + 1)).long().clamp_(max=t)
        dup = (chosen == x[:, None]).any(dim=1)
        chosen = torch.cat([chosen, torch.where(dup, torch.full_like(x, t), x)[:, None]], dim=1)
    return chosen


def random_(count: int, block: int, seed: int = 0) -> Mask:
    """`random(count, block, seed)`; no block drawn is `empty`."""
    return Random(count, block, seed) if count else EMPTY


BUILDERS = {"random": Builder(random_, {"count": (0, None), "block": (1, "block size"), "seed": (0, None)})}
