"""Block layouts: each (BM x BN) tile of a mask classified empty (0), partial (1) or full (2), in closed form.

Each mask node classifies tiles itself (`Mask.classify` in `ir/masks/`): bands by interval arithmetic on
`i - j`, index sets by counting members per tile, blocks by block-index ranges, `random` by counting its drawn
blocks, `where` by interval arithmetic on the predicate, `same` by per-tile id ranges; combinators combine
classes. A tile the combination cannot tell (two partial parts: their union may be full) is settled here by
evaluating its pairs when those tiles hold at most `REFINE_BUDGET` pairs. Classes are exact where they say
full or empty.

Work is proportional to the nonempty tiles: each node also enumerates a superset of its nonempty tiles
(`Mask.candidates`: a band gives a range of key tiles per query tile), combined by set union or by the
sparsest part of an intersection; only complements, `full`, `where` and `same` enumerate every tile.
`tile_layout` returns the sparse form (a CSR over query tiles), `block_layout` the dense int8 grid. With a
query offset o, query row r is at position o + r (the grid's row bounds are absolute).

>>> from patterndsl.ir.mask import sliding
>>> block_layout(sliding(1), 8, 8, 4, 4).tolist()
[[1, 1], [1, 1]]
>>> block_layout(sliding(4), 8, 8, 4, 4).tolist()
[[2, 1], [1, 2]]
>>> tile_layout(sliding(4), 12, 12, 4, 4).col_idx.tolist()
[0, 1, 0, 1, 2, 1, 2]
"""
from __future__ import annotations

import torch

from ..ir import mask as M
from ..ir.dense import mask_at
from ..ir.masks import EMPTY_TILE as EMPTY
from ..ir.masks import FULL_TILE as FULL
from ..ir.masks import PARTIAL, Tiles, classes
from ..ir.masks.band import band_bounds as _band_bounds
from .tiles import Grid, TileLayout

__all__ = ["EMPTY", "FULL", "PARTIAL", "REFINE_BUDGET", "band_bounds", "block_layout", "tile_layout", "tile_lists"]
REFINE_BUDGET = 1 << 22   # pairs evaluated to settle tiles the combinators cannot classify


def tile_layout(mask: M.Mask, n_q: int, n_k: int, block_m: int = 64, block_n: int = 64,
                runtime: dict | None = None, q_offset: int = 0) -> TileLayout:
    """The sparse layout: per query tile the nonempty key tiles (sorted) and their classes."""
    g = Grid(n_q, n_k, block_m, block_n, q_offset)
    tiles = Tiles(g, runtime)
    cand = mask.candidates(tiles) if g.nqb and g.nkb else (torch.zeros(0, dtype=torch.long),) * 2
    if cand is None:
        cls = _settled(mask, tiles, torch.arange(g.nqb)[:, None], torch.arange(g.nkb)[None, :])
        a, b = cls.nonzero(as_tuple=True)
        return TileLayout.from_sorted(g, a, b, cls[a, b])
    a, b = cand
    cls = _settled(mask, tiles, a, b)
    keep = cls != EMPTY
    return TileLayout.from_sorted(g, a[keep], b[keep], cls[keep])


def block_layout(mask: M.Mask, n_q: int, n_k: int, block_m: int = 64, block_n: int = 64,
                 runtime: dict | None = None, q_offset: int = 0) -> torch.Tensor:
    """int8 `[ceil(n_q/BM), ceil(n_k/BN)]`: 0 empty, 1 partial, 2 full (the element mask needed only on 1)."""
    g = Grid(max(n_q, 0), max(n_k, 0), block_m, block_n, q_offset)
    if not (g.nqb and g.nkb):
        return torch.zeros(g.nqb, g.nkb, dtype=torch.int8)
    tiles = Tiles(g, runtime)
    cand = mask.candidates(tiles)
    if cand is None or cand[0].numel() * 4 > g.nqb * g.nkb:
        return _settled(mask, tiles, torch.arange(g.nqb)[:, None], torch.arange(g.nkb)[None, :])
    a, b = cand
    out = torch.zeros(g.nqb, g.nkb, dtype=torch.int8)
    out[a, b] = _settled(mask, tiles, a, b)
    return out


def tile_lists(layout):
    """CSR of a layout (dense int8 grid or `TileLayout`): (row_ptr [nqb+1], col_idx [nnz], is_full [nnz])."""
    if isinstance(layout, TileLayout):
        return layout.row_ptr.to(torch.int32), layout.col_idx.to(torch.int32), layout.cls == FULL
    nz = layout != EMPTY
    row_ptr = torch.zeros(layout.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = nz.sum(1).cumsum(0)
    rows, cols = nz.nonzero(as_tuple=True)
    return row_ptr, cols.to(torch.int32), layout[rows, cols] == FULL


def band_bounds(band: M.Band, n_q: int, n_k: int, block_m: int, block_n: int, by: str = "rows",
                q_offset: int = 0):
    """Arithmetic loop bounds of a band: for each query tile (`by="rows"`) the first and last key tile that meet
    it, or for each key tile (`by="cols"`) the first and last query tile; `last < first` where none do."""
    if not isinstance(band, M.Band):
        raise TypeError(f"band_bounds takes a Band, got {type(band).__name__}")
    return _band_bounds(band, Grid(n_q, n_k, block_m, block_n, q_offset), by)


def _settled(m: M.Mask, tiles: Tiles, a, b) -> torch.Tensor:
    """Classes at tiles (a, b) (broadcastable), with uncertain partial tiles evaluated when cheap."""
    cls, unsure = m.classify(tiles, a, b)
    cls, unsure, a, b = torch.broadcast_tensors(cls, unsure, a, b)
    cls = cls.to(torch.int8).clone()
    pick = (unsure & (cls == PARTIAL)).nonzero(as_tuple=True)
    g = tiles.grid
    n = pick[0].numel()
    if n == 0 or n * g.bm * g.bn > REFINE_BUDGET or (M.runtime_inputs(m) and not tiles.runtime):
        return cls
    cls[pick] = _evaluate_tiles(m, tiles, a[pick], b[pick])
    return cls


def _evaluate_tiles(m, tiles: Tiles, a, b) -> torch.Tensor:
    g = tiles.grid
    i = (a * g.bm)[:, None, None] + torch.arange(g.bm)[None, :, None]
    j = (b * g.bn)[:, None, None] + torch.arange(g.bn)[None, None, :]
    valid = (i < g.n_q) & (j < g.n_k)
    ok = mask_at(m, i, j, (g.n_q, g.n_k), tiles.runtime, g.q_offset)
    some, every = (ok.any(0), ok.all(0)) if ok.dim() == 4 else (ok, ok)     # runtime ids: per batch row
    full = (every | ~valid).flatten(1).all(1)
    empty = ~(some & valid).flatten(1).any(1)
    return classes(full, empty)
