"""`Region`: a mask on a window of a bigger problem, so a rank's local call evaluates masks at absolute positions.

A rank holds query rows `[q0, q0 + n)` and a key buffer covering keys `[k0, k0 + m)` of an `N_q x N_k`
problem. `Region(mask, q0, k0, N_q, N_k)` is the mask of that local call: local row r and local key c are
at absolute positions (q0 + r, k0 + c), and data drawn from the problem's size (`random`'s table) is drawn
for the whole `N_q x N_k` problem, as the single-process op draws it. It is an ordinary mask node (the
protocol of `ir/masks/base.py`), so the torch backend's `softmax_attention` runs it unchanged:

- `at` evaluates the inner mask at shifted indices through a thin proxy of the caller's ops;
- `classify` and `candidates` ask the inner mask on the absolute grid of the local rows and keys (the query
  offset is the grid's own; the key offset is met by classifying on a grid of `gcd(BN, k0)`-key tiles and
  combining them), so a band stays a band: the local layout costs what the band costs, never `n x m`.

>>> import torch
>>> from patterndsl.ir.mask import sliding, cols
>>> from patterndsl.ir.dense import dense_mask
>>> m = sliding(2) | cols({0})
>>> local = dense_mask(Region(m, 6, 4, 12, 12), 3, 5)       # rows 6..8 x keys 4..8
>>> torch.equal(local, dense_mask(m, 12)[6:9, 4:9])
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir import mask as M
from ..ir.masks import EMPTY_TILE, FULL_TILE, PARTIAL, Tiles, classes
from ..plan.tiles import Grid


@dataclass(frozen=True, repr=True)
class Region(M.Mask):
    """`mask` on rows `q0 + r`, keys `k0 + c` of an `n_q x n_k` problem (r, c: the local call's row and key)."""
    mask: M.Mask
    q0: int
    k0: int
    n_q: int
    n_k: int

    @property
    def children(self) -> tuple:
        return (self.mask,)

    def source(self) -> str:
        return f"region({self.mask.source()}, q0 = {self.q0}, k0 = {self.k0}, n = {self.n_q} x {self.n_k})"

    def label(self) -> str:
        return f"{self.mask.label()} @ ({self.q0}, {self.k0})"

    def at(self, i, j, ops):
        qi = ops.bin("+", i, ops.const(self.q0)) if self.q0 else i
        kj = ops.bin("+", j, ops.const(self.k0)) if self.k0 else j
        return self.mask.at(qi, kj, _RegionOps(ops, self))

    # ------------------------------------------------------------------------------------------- tiles
    def _absolute(self, tiles: Tiles):
        """(absolute tiles, key tile width on them, fine tiles per local key tile)."""
        g = tiles.grid
        fine = math.gcd(g.bn, self.k0) if self.k0 else g.bn
        qa = self.q0 + g.q_offset
        rows, keys = max(self.n_q - qa, 0), self.n_k
        if not self._draws:
            rows, keys = min(g.n_q, rows), min(self.k0 + g.n_k, keys)
        grid = Grid(rows, keys, g.bm, fine, qa)
        return Tiles(grid, self._placed(tiles.runtime, grid)), fine, g.bn // fine

    @property
    def _draws(self) -> bool:
        """Whether the mask draws from the problem's size (`random`): its grid then runs to the last row and key,
        as the draw reads the grid's size (enumerating those costs more, and random masks are sparse)."""
        return any(isinstance(node, M.Random) for node in M.walk(self.mask))

    def _placed(self, runtime, grid: Grid):
        """The local call's runtime ids where the whole problem has them (query ids from the grid's first row,
        key ids from key k0), edge values repeated outside: a tile's id range then reads local ids only."""
        if not runtime:
            return runtime
        out = {}
        for name, ids in runtime.items():
            q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
            out[name] = (_place(q_ids, 0, grid.n_q), _place(k_ids, self.k0, grid.n_k))
        return out

    def classify(self, tiles, a, b):
        at, fine, ratio = self._absolute(tiles)
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        fb = (self.k0 // fine + b[..., None] * ratio + torch.arange(ratio)).clamp(max=max(at.grid.nkb - 1, 0))
        cls, unsure = self.mask.classify(at, a[..., None], fb)
        cls, unsure, _ = torch.broadcast_tensors(cls, unsure, fb)
        full, empty = (cls == FULL_TILE).all(-1), (cls == EMPTY_TILE).all(-1)
        out = classes(full, empty)
        return out, (unsure.any(-1) | ~(full | empty)) & (out == PARTIAL)

    def candidates(self, tiles):
        g = tiles.grid
        at, fine, _ = self._absolute(tiles)
        cand = self.mask.candidates(at) if at.grid.nqb and at.grid.nkb else None
        if cand is None:
            return None
        a, f = cand
        b = torch.div(f * fine - self.k0, g.bn, rounding_mode="floor")
        keep = (a < g.nqb) & (f * fine + fine > self.k0) & (b < g.nkb)
        lin = torch.unique(a[keep] * g.nkb + b[keep].clamp(min=0))
        return lin // g.nkb, lin % g.nkb


def _place(ids: torch.Tensor, at: int, n: int) -> torch.Tensor:
    """ids `[B, m]` at columns `[at, at + m)` of a `[B, n]` tensor, the edge values repeated outside."""
    if ids.shape[1] == 0:
        return ids.new_zeros(ids.shape[0], n)
    left = ids[:, :1].expand(-1, min(at, n))
    right = ids[:, -1:].expand(-1, max(n - at - ids.shape[1], 0))
    return torch.cat([left, ids, right], 1)[:, :n]


class _RegionOps:
    """The caller's ops, with tables drawn for the whole problem and runtime ids read at local rows."""

    def __init__(self, ops, region: Region):
        self._ops, self._region = ops, region

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def lookup(self, node, row, value):
        return self._ops.lookup(_Drawn(node, self._region.n_q, self._region.n_k), row, value)

    def ids(self, name, side, x):
        shift = self._region.q0 if side == "q" else self._region.k0
        return self._ops.ids(name, side, self._ops.bin("-", x, self._ops.const(shift)) if shift else x)


@dataclass(frozen=True)
class _Drawn:
    """A table node whose table is always drawn for an `n_q x n_k` problem."""
    node: object
    n_q: int
    n_k: int

    @property
    def width(self) -> int:
        return self.node.width

    def table(self, n_q: int, n_k: int) -> torch.Tensor:
        return self.node.table(self.n_q, self.n_k)
