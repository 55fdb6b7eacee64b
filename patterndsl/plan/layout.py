"""Block layouts: each (BM x BN) tile of a mask classified empty (0), partial (1) or full (2), in closed form.

Each primitive classifies tiles analytically: bands by interval arithmetic on `i - j` over the tile (residues
for dilated/strided bands), row and column sets by counting members per tile, blocks by block-index ranges,
`random` by counting its drawn blocks, `where` by interval arithmetic on the predicate (`interval.py`), `same`
by per-tile id ranges (runtime ids) or as partial (none given). Combinators combine classes: a union is full if
a part is, empty if all are; an intersection dually; a complement swaps full and empty. A tile where the
combination cannot tell (two partial parts: their union may be full) is settled by evaluating its pairs when
those tiles hold at most `REFINE_BUDGET` pairs. Classes are exact where they say full or empty.

Work is proportional to the nonempty tiles: each primitive also enumerates a superset of its nonempty tiles
(a band: a range of key tiles per query tile), combined by set union or by the sparsest part of an
intersection; only complements, `full`, `where` and `same` enumerate every tile. `tile_layout` returns the
sparse form (a CSR over query tiles), `block_layout` the dense int8 grid.

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
from .interval import tile_truth
from .points import mask_at
from .tiles import Grid, TileLayout, ranges_to_pairs

EMPTY, PARTIAL, FULL = 0, 1, 2
REFINE_BUDGET = 1 << 22   # pairs evaluated to settle tiles the combinators cannot classify


# ---------------------------------------------------------------------------------------------- public
def tile_layout(mask: M.Mask, n_q: int, n_k: int, block_m: int = 64, block_n: int = 64,
                runtime: dict | None = None) -> TileLayout:
    """The sparse layout: per query tile the nonempty key tiles (sorted) and their classes."""
    g = Grid(n_q, n_k, block_m, block_n)
    ctx = _Ctx(g, runtime)
    cand = _candidates(mask, ctx) if g.nqb and g.nkb else (torch.zeros(0, dtype=torch.long),) * 2
    if cand is None:
        cls = _settled(mask, ctx, torch.arange(g.nqb)[:, None], torch.arange(g.nkb)[None, :])
        a, b = cls.nonzero(as_tuple=True)
        return TileLayout.from_sorted(g, a, b, cls[a, b])
    a, b = cand
    cls = _settled(mask, ctx, a, b)
    keep = cls != EMPTY
    return TileLayout.from_sorted(g, a[keep], b[keep], cls[keep])


def block_layout(mask: M.Mask, n_q: int, n_k: int, block_m: int = 64, block_n: int = 64,
                 runtime: dict | None = None) -> torch.Tensor:
    """int8 `[ceil(n_q/BM), ceil(n_k/BN)]`: 0 empty, 1 partial, 2 full (the element mask needed only on 1)."""
    g = Grid(max(n_q, 0), max(n_k, 0), block_m, block_n)
    if not (g.nqb and g.nkb):
        return torch.zeros(g.nqb, g.nkb, dtype=torch.int8)
    ctx = _Ctx(g, runtime)
    cand = _candidates(mask, ctx)
    if cand is None or cand[0].numel() * 4 > g.nqb * g.nkb:
        return _settled(mask, ctx, torch.arange(g.nqb)[:, None], torch.arange(g.nkb)[None, :])
    a, b = cand
    out = torch.zeros(g.nqb, g.nkb, dtype=torch.int8)
    out[a, b] = _settled(mask, ctx, a, b)
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


def band_bounds(band: M.Band, n_q: int, n_k: int, block_m: int, block_n: int, by: str = "rows"):
    """Arithmetic loop bounds of a band: for each query tile (`by="rows"`) the first and last key tile that meet
    it, or for each key tile (`by="cols"`) the first and last query tile; `last < first` where none do."""
    if not isinstance(band, M.Band):
        raise TypeError(f"band_bounds takes a Band, got {type(band).__name__}")
    g = Grid(n_q, n_k, block_m, block_n)
    if by == "rows":
        r0, r1 = g.row_bounds(torch.arange(g.nqb))
        lo_j = r0 - band.hi if band.hi is not None else torch.zeros_like(r0)
        hi_j = r1 - band.lo if band.lo is not None else torch.full_like(r1, n_k - 1)
        return _tile_span(lo_j, hi_j, n_k, block_n)
    c0, c1 = g.col_bounds(torch.arange(g.nkb))
    lo_i = c0 + band.lo if band.lo is not None else torch.zeros_like(c0)
    hi_i = c1 + band.hi if band.hi is not None else torch.full_like(c1, n_q - 1)
    return _tile_span(lo_i, hi_i, n_q, block_m)


def _tile_span(lo, hi, n, block):
    lo, hi = lo.clamp(min=0), hi.clamp(max=n - 1)
    none = lo > hi
    first = torch.where(none, 0, lo // block)
    last = torch.where(none, -1, hi // block)
    return first, last


# ------------------------------------------------------------------------------------------ candidates
class _Ctx:
    def __init__(self, g: Grid, runtime):
        self.g, self.runtime, self.cache = g, runtime, {}

    def members(self, idx: frozenset, n: int) -> torch.Tensor:
        key = (idx, n)
        if key not in self.cache:
            self.cache[key] = torch.tensor(sorted(x for x in idx if 0 <= x < n), dtype=torch.long)
        return self.cache[key]

    def chosen(self, m: M.Random) -> torch.Tensor:
        if m not in self.cache:
            self.cache[m] = M.random_blocks(m.count, m.block, m.seed, self.g.n_q, self.g.n_k)
        return self.cache[m]


def _candidates(m: M.Mask, ctx: _Ctx):
    """(a, b): sorted, distinct tile coordinates holding every nonempty tile of m, or None (every tile)."""
    g = ctx.g
    all_rows = torch.arange(g.nqb)
    if isinstance(m, M.Empty):
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if isinstance(m, M.Band):
        first, last = band_bounds(m, g.n_q, g.n_k, g.bm, g.bn)
        return ranges_to_pairs(all_rows, first, last + 1)
    if isinstance(m, M.Blocks):
        r0, r1 = g.row_bounds(all_rows)
        lo_j = (r0 // m.size) * m.size
        hi_j = torch.clamp((r1 // m.size + 1) * m.size - 1, max=g.n_k - 1)
        first, last = _tile_span(lo_j, hi_j, g.n_k, g.bn)
        return ranges_to_pairs(all_rows, first, last + 1)
    if isinstance(m, M.Rows):
        tiles = torch.unique(ctx.members(m.idx, g.n_q) // g.bm)
        return tiles.repeat_interleave(g.nkb), torch.arange(g.nkb).repeat(tiles.numel())
    if isinstance(m, M.Cols):
        tiles = torch.unique(ctx.members(m.idx, g.n_k) // g.bn)
        return all_rows.repeat_interleave(tiles.numel()), tiles.repeat(g.nqb)
    if isinstance(m, M.Random):
        return _random_candidates(m, ctx)
    if isinstance(m, M.Union):
        parts = [_candidates(p, ctx) for p in m.parts]
        if any(p is None for p in parts):
            return None
        lin = torch.unique(torch.cat([a * g.nkb + b for a, b in parts]))
        return lin // g.nkb, lin % g.nkb
    if isinstance(m, M.Inter):
        parts = [c for c in (_candidates(p, ctx) for p in m.parts) if c is not None]
        return min(parts, key=lambda c: c[0].numel()) if parts else None
    return None  # full, complements, where, same: every tile


def _random_candidates(m: M.Random, ctx: _Ctx):
    g = ctx.g
    chosen = ctx.chosen(m)                                             # [n random rows, c]
    r0, r1 = g.row_bounds(torch.arange(g.nqb))
    a, rr = ranges_to_pairs(torch.arange(g.nqb), r0 // m.block, r1 // m.block + 1)   # (tile, random row)
    kb = chosen[rr]                                                    # [P, c] drawn key blocks
    a = a[:, None].expand_as(kb).reshape(-1)
    kb = kb.reshape(-1)
    first = kb * m.block // g.bn
    last = torch.clamp((kb + 1) * m.block, max=g.n_k).sub(1) // g.bn
    a, b = ranges_to_pairs(a, first, last + 1)
    lin = torch.unique(a * g.nkb + b)
    return lin // g.nkb, lin % g.nkb


# --------------------------------------------------------------------------------------- classification
def _settled(m: M.Mask, ctx: _Ctx, a, b) -> torch.Tensor:
    """Classes at tiles (a, b) (broadcastable), with uncertain partial tiles evaluated when cheap."""
    cls, unsure = _classify(m, ctx, a, b)
    cls, unsure, a, b = torch.broadcast_tensors(cls, unsure, a, b)
    cls = cls.to(torch.int8).clone()
    pick = (unsure & (cls == PARTIAL)).nonzero(as_tuple=True)
    g = ctx.g
    n = pick[0].numel()
    if n == 0 or n * g.bm * g.bn > REFINE_BUDGET or (M.runtime_inputs(m) and not ctx.runtime):
        return cls
    cls[pick] = _evaluate_tiles(m, ctx, a[pick], b[pick])
    return cls


def _evaluate_tiles(m, ctx: _Ctx, a, b) -> torch.Tensor:
    g = ctx.g
    i = (a * g.bm)[:, None, None] + torch.arange(g.bm)[None, :, None]
    j = (b * g.bn)[:, None, None] + torch.arange(g.bn)[None, None, :]
    valid = (i < g.n_q) & (j < g.n_k)
    ok = mask_at(m, i, j, (g.n_q, g.n_k), ctx.runtime)
    some, every = (ok.any(0), ok.all(0)) if ok.dim() == 4 else (ok, ok)     # runtime ids: per batch row
    full = (every | ~valid).flatten(1).all(1)
    empty = ~(some & valid).flatten(1).any(1)
    return _combine(full, empty)


def _combine(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


def _sure(cls: torch.Tensor):
    return cls, torch.zeros((), dtype=torch.bool)


def _classify(m: M.Mask, ctx: _Ctx, a, b):
    """(class, unsure): tile classes at (a, b) and where a partial class may be wrong (full or empty)."""
    g = ctx.g
    if isinstance(m, (M.Full, M.Empty)):
        return _sure(torch.tensor(FULL if isinstance(m, M.Full) else EMPTY, dtype=torch.int8))
    if isinstance(m, M.Band):
        return _sure(_band(m, g, a, b))
    if isinstance(m, (M.Rows, M.Cols)):
        rows = isinstance(m, M.Rows)
        n, block, nb, t = (g.n_q, g.bm, g.nqb, a) if rows else (g.n_k, g.bn, g.nkb, b)
        count = torch.bincount(ctx.members(m.idx, n) // block, minlength=nb)[t]
        size = (g.row_bounds(t) if rows else g.col_bounds(t))
        return _sure(_combine(count == size[1] - size[0] + 1, count == 0))
    if isinstance(m, M.Blocks):
        (r0, r1), (c0, c1) = g.row_bounds(a), g.col_bounds(b)
        qa, qb, ka, kb = r0 // m.size, r1 // m.size, c0 // m.size, c1 // m.size
        return _sure(_combine((qa == qb) & (ka == kb) & (qa == ka), (qb < ka) | (kb < qa)))
    if isinstance(m, M.Random):
        return _sure(_random(m, ctx, a, b))
    if isinstance(m, M.Same):
        return _same(m, ctx, a, b)
    if isinstance(m, M.Where):
        (r0, r1), (c0, c1) = g.row_bounds(a), g.col_bounds(b)
        t = tile_truth(m.pred, r0, r1, c0, c1)
        cls = _combine(~t.can_false, ~t.can_true)
        return cls, cls == PARTIAL
    if isinstance(m, M.Not):
        cls, unsure = _classify(m.part, ctx, a, b)
        return (FULL - cls).to(torch.int8), unsure
    parts = [_classify(p, ctx, a, b) for p in m.parts]
    classes = torch.stack(torch.broadcast_tensors(*[c for c, _ in parts]))
    unsure = torch.stack(torch.broadcast_tensors(*[u for _, u in parts])).any(0)
    if isinstance(m, M.Union):
        cls = _combine((classes == FULL).any(0), (classes == EMPTY).all(0))
    else:
        cls = _combine((classes == FULL).all(0), (classes == EMPTY).any(0))
    several = (classes == PARTIAL).sum(0) > 1      # e.g. two partial parts whose union is full
    return cls, (unsure | several) & (cls == PARTIAL)


def _band(m: M.Band, g: Grid, a, b) -> torch.Tensor:
    (r0, r1), (c0, c1) = g.row_bounds(a), g.col_bounds(b)
    dmin, dmax = r0 - c1, r1 - c0                        # the range of i - j over the tile
    lo = dmin if m.lo is None else dmin.clamp(min=m.lo)
    hi = dmax if m.hi is None else dmax.clamp(max=m.hi)
    inside = torch.ones((), dtype=torch.bool)
    if m.lo is not None:
        inside = inside & (dmin >= m.lo)
    if m.hi is not None:
        inside = inside & (dmax <= m.hi)
    if m.step == 1:
        return _combine(inside, lo > hi)
    first = -torch.div(-lo, m.step, rounding_mode="floor") * m.step    # the first multiple of step >= lo
    single = (dmin == dmax) & (torch.remainder(dmin, m.step) == 0)
    return _combine(inside & single, first > hi)


def _random(m: M.Random, ctx: _Ctx, a, b) -> torch.Tensor:
    """Count the drawn (query block, key block) pairs inside each tile's block rectangle."""
    g = ctx.g
    chosen = ctx.chosen(m)
    (r0, r1), (c0, c1) = g.row_bounds(a), g.col_bounds(b)
    qa, qb = r0 // m.block, r1 // m.block + 1
    ka, kb = c0 // m.block, c1 // m.block + 1
    span = -(-g.bm // m.block) + 1                     # random rows one tile can touch
    rows = qa[..., None] + torch.arange(span)          # [..., span]
    live = rows < qb[..., None]
    picks = chosen[rows.clamp(max=chosen.shape[0] - 1)]              # [..., span, c]
    hit = (picks >= ka[..., None, None]) & (picks < kb[..., None, None]) & live[..., None]
    total = hit.flatten(-2).sum(-1)
    area = (qb - qa) * (kb - ka)
    return _combine(total == area, total == 0)


def _same(m: M.Same, ctx: _Ctx, a, b):
    """Per-tile id ranges: disjoint ranges in every batch row give empty, one shared id everywhere full."""
    runtime = ctx.runtime or {}
    if m.name not in runtime:
        return torch.tensor(PARTIAL, dtype=torch.int8), torch.zeros((), dtype=torch.bool)
    ids = runtime[m.name]
    q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
    g = ctx.g
    qmin, qmax = _tile_range(q_ids.cpu(), g.bm, g.nqb)                  # [B, nqb]
    kmin, kmax = _tile_range(k_ids.cpu(), g.bn, g.nkb)
    qmin, qmax, kmin, kmax = qmin[:, a], qmax[:, a], kmin[:, b], kmax[:, b]
    empty = ((qmax < kmin) | (kmax < qmin)).all(0)
    full = ((qmin == qmax) & (kmin == kmax) & (qmin == kmin)).all(0)
    cls = _combine(full, empty)
    return cls, cls == PARTIAL


def _tile_range(ids: torch.Tensor, block: int, nb: int):
    pad = nb * block - ids.shape[1]
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1)   # repeat the last id: ranges unchanged
    t = ids.view(ids.shape[0], nb, block)
    return t.amin(-1), t.amax(-1)
