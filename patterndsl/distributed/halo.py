"""The exchange plan of a softmax stage: which keys each rank needs from which other ranks, from the tile layout.

For every rank and each of its query segments, the closed-form layout (`plan/layout.tile_layout` with the
segment's `q_offset`) lists the nonempty key tiles. Consecutive tiles form runs; runs closer than `GAP`
keys share one key buffer (the keys between them are never fetched: zeros, masked out, never read), so a
band gives one buffer (own keys plus a halo on each side), `global` columns a small extra one, and random
blocks a few. Each buffer is cut at owner boundaries; what another rank owns is sent to this rank once,
however many buffers read it.

Global rows (the rows of `rows(S)` / `global(S)` nodes, which see every key) are not served by pulling keys:
each rank computes them against its own keys and the parts are merged by log-sum-exp. For the other rows the
layout is taken of the mask with those nodes removed (`rest`), which agrees with the mask on every row not in
S; so one global token does not make its tile row pull the whole sequence.

>>> from patterndsl.ir.mask import sliding, global_
>>> from patterndsl.distributed.sharding import contiguous
>>> p = halo_plan(sliding(64) | global_({0}), contiguous(1024, 4))
>>> p.rows, [(b.lo, b.hi) for b in p.buffers[2]]
((0,), [(0, 32), (448, 832)])
>>> p.needs[2]                              # rank 2 receives (from, abs_lo, abs_hi)
((0, 0, 32), (1, 448, 512), (3, 768, 832))
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ir import mask as M
from ..plan.layout import tile_layout
from .region import Region
from .sharding import Sharding

BLOCK = (64, 32)   # the layout's tiles when deriving halos: keys are fetched in runs of 32
GAP = 256          # runs of needed keys at most this far apart share a buffer
GRID = 1 << 18     # at most this many tiles per segment's grid: longer segments get taller query tiles


@dataclass(frozen=True)
class Buffer:
    """The keys `[lo, hi)` one local call reads for segment `seg` of its rank; `pieces` are the filled ranges
    (owner, abs_lo, abs_hi), ascending; the rest of the buffer is zeros."""
    seg: int
    lo: int
    hi: int
    pieces: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class HaloPlan:
    """Per rank: key buffers, and the ranges it receives; `rows` are the global rows, `rest` the mask of the
    other rows."""
    sharding: Sharding
    mask: M.Mask
    rest: M.Mask
    rows: tuple[int, ...]
    buffers: tuple[tuple[Buffer, ...], ...]
    needs: tuple[tuple[tuple[int, int, int], ...], ...]   # per rank: (src, abs_lo, abs_hi), sorted by src, lo

    def sends(self, rank: int) -> dict[int, list[tuple[int, int]]]:
        """What `rank` sends: destination -> [(abs_lo, abs_hi)] in the order the destination expects."""
        out: dict[int, list] = {}
        for dst, need in enumerate(self.needs):
            for src, a, b in need:
                if src == rank:
                    out.setdefault(dst, []).append((a, b))
        return out

    def recvs(self, rank: int) -> dict[int, list[tuple[int, int]]]:
        """What `rank` receives: source -> [(abs_lo, abs_hi)] in message order."""
        out: dict[int, list] = {}
        for src, a, b in self.needs[rank]:
            out.setdefault(src, []).append((a, b))
        return out

    def keys_received(self, rank: int) -> int:
        return sum(b - a for _, a, b in self.needs[rank])

    def keys_sent(self, rank: int) -> int:
        return sum(b - a for ranges in self.sends(rank).values() for a, b in ranges)


def global_rows(mask: M.Mask, n: int) -> tuple[int, ...]:
    """The rows of the mask's `rows(S)` nodes inside `[0, n)`."""
    return tuple(sorted({i for node in M.walk(mask) if isinstance(node, M.Rows) for i in node.idx if i < n}))


def without_rows(mask: M.Mask) -> M.Mask:
    """The mask with every `rows(S)` node replaced by `empty`: equal to `mask` on every row outside the S."""
    if isinstance(mask, M.Rows):
        return M.EMPTY
    if isinstance(mask, M.Union):
        return M.union(*(without_rows(p) for p in mask.parts))
    if isinstance(mask, M.Inter):
        return M.inter(*(without_rows(p) for p in mask.parts))
    if isinstance(mask, M.Not):
        return M.complement(without_rows(mask.part))
    return mask


def halo_plan(mask: M.Mask, sharding: Sharding, block: tuple[int, int] = BLOCK, gap: int = GAP,
              runtime: dict | None = None) -> HaloPlan:
    """The exchange plan of `mask` (queries and keys sharded alike by `sharding`). A mask reading runtime ids
    (`same(name)`) is planned from `runtime` (name -> ids `[B, N]` of the whole sequence), or without them
    as if every pair might be allowed."""
    if runtime is None or not M.runtime_inputs(mask):
        return _cached(mask, sharding, block, gap)
    return _plan(mask, sharding, block, gap, runtime)


@functools.lru_cache(maxsize=64)
def _cached(mask, sharding, block, gap) -> HaloPlan:
    return _plan(mask, sharding, block, gap, None)


def _plan(mask, sharding, block, gap, runtime) -> HaloPlan:
    n = sharding.seq_len
    rest = without_rows(mask)
    buffers = tuple(tuple(b for s, (a, e) in enumerate(segs)
                          for b in _buffers(rest, sharding, s, a, e, block, gap, runtime))
                    for segs in sharding.segments)
    needs = tuple(_needs(bufs, rank) for rank, bufs in enumerate(buffers))
    return HaloPlan(sharding, mask, rest, global_rows(mask, n), buffers, needs)


def _buffers(rest: M.Mask, sh: Sharding, seg: int, a: int, e: int, block, gap, runtime) -> list[Buffer]:
    """The key buffers of the query rows `[a, e)`."""
    if e <= a or rest == M.EMPTY:
        return []
    bn = block[1]
    bm = max(block[0], -(-(e - a) * -(-sh.seq_len // bn) // GRID))   # the union over rows is the same: cheaper
    rows = Region(rest, a, 0, sh.seq_len, sh.seq_len)      # rows [a, e) of the whole problem (random's draw)
    local = {k: (ids[:, a:e], ids) for k, ids in runtime.items()} if runtime else None
    tiles = torch.unique(tile_layout(rows, e - a, sh.seq_len, bm, bn, local).col_idx).tolist()
    runs: list[list[int]] = []
    for t in tiles:
        lo, hi = t * bn, min((t + 1) * bn, sh.seq_len)
        if runs and lo == runs[-1][1]:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi])
    groups: list[list[list[int]]] = []
    for run in runs:
        if groups and run[0] - groups[-1][-1][1] <= gap:
            groups[-1].append(run)
        else:
            groups.append([run])
    out = []
    for g in groups:
        pieces = tuple((o, x, y) for lo, hi in g for o, x, y, _ in sh.pieces(lo, hi))
        out.append(Buffer(seg, g[0][0], g[-1][1], pieces))
    return out


def _needs(buffers: tuple[Buffer, ...], rank: int) -> tuple[tuple[int, int, int], ...]:
    """The ranges other ranks own that `rank`'s buffers read, merged per source."""
    by_src: dict[int, list[list[int]]] = {}
    for o, x, y in sorted({p for b in buffers for p in b.pieces if p[0] != rank}):
        ranges = by_src.setdefault(o, [])
        if ranges and x <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], y)
        else:
            ranges.append([x, y])
    return tuple((o, x, y) for o in sorted(by_src) for x, y in by_src[o])
