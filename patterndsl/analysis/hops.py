"""One hop through a mask: the keys that a set of queries may read, as bool vectors, never an N x N matrix.

`image(mask, queries)` takes a bool vector over `n_q` query positions and gives the bool vector over `n_k`
keys that some query in the set may attend to. The mask is split into terms (its union parts, intersections
distributed over unions); in each term, factors that read only `i` (rows, `where(i < 5)`) filter the
queries, factors that read only `j` filter the keys, and the rest (the core) is one hop, by its kind:

- a band: an interval of keys per query on its residue class, by difference arrays (O(N));
- blocks: every key of a touched block; a band inside blocks: an interval per query (O(N));
- random blocks: the drawn key blocks of the touched query blocks;
- a `where` that depends on `i - j` alone: a correlation of the query set with the allowed offsets (FFT);
- anything else: the mask's tile layout, with partial tiles evaluated for the queries in the set only.

>>> import torch
>>> from patterndsl.ir import mask as M
>>> q = torch.zeros(10, dtype=torch.bool); q[5] = True
>>> image(M.sliding(2), q).nonzero().flatten().tolist()
[3, 4, 5, 6, 7]
>>> image(M.sliding(1, 3) | M.cols({0}), q).nonzero().flatten().tolist()
[0, 2, 5, 8]
"""
from __future__ import annotations

import functools
import itertools

import torch

from ..ir import mask as M
from ..plan.layout import FULL, tile_layout
from ..plan.points import mask_at
from .intervals import band_runs, merge, runs, to_bits
from .primitives import profile, reads

MAX_TERMS = 64
BLOCK = 64


def terms(m: M.Mask) -> list[list[M.Mask]]:
    """`m` as a union of intersections (lists of factors), distributing & over | (up to MAX_TERMS terms)."""
    if isinstance(m, M.Union):
        out = [t for p in m.parts for t in terms(p)]
    elif isinstance(m, M.Inter):
        out = [[]]
        for p in m.parts:
            out = [a + b for a, b in itertools.product(out, terms(p))]
            if len(out) > MAX_TERMS:
                return [[m]]
    else:
        out = [[m]]
    return out if len(out) <= MAX_TERMS else [[m]]


def _band(m: M.Band, q: torch.Tensor, n_k: int) -> torch.Tensor:
    """Keys x - d, d in [lo, hi] on multiples of step, for every query x in q: on each residue class of x
    (positions c + s*t), a run of queries t in [a, b] reaches keys t in [a - hi/s, b - lo/s]."""
    s = m.step
    width = max(-(-q.numel() // s), -(-n_k // s)) + 1          # one spare column: runs never join classes
    grid = torch.zeros(width * s, dtype=torch.bool)
    grid[:q.numel()] = q
    line = grid.view(width, s).t().reshape(-1)                     # class-major: [s, width]
    start, end = runs(line)
    c, a, b = start // width, start % width, end % width
    k_rows = -(-n_k // s)
    lo = a - m.hi // s if m.hi is not None else torch.zeros_like(a)
    hi = b - m.lo // s if m.lo is not None else torch.full_like(b, k_rows - 1)
    lo, hi = lo.clamp(min=0), hi.clamp(max=k_rows - 1)
    keep = lo <= hi
    hit = to_bits(c[keep] * width + lo[keep], c[keep] * width + hi[keep], s * width)
    return hit.view(s, width).t().reshape(-1)[:n_k]


def _blocks(m: M.Blocks, q: torch.Tensor, n_k: int) -> torch.Tensor:
    b = m.size
    touched = torch.zeros(-(-max(q.numel(), n_k) // b) * b, dtype=torch.bool)
    touched[:q.numel()] = q
    hit = touched.view(-1, b).any(1)
    return hit.repeat_interleave(b)[:n_k]


def _band_in_blocks(band: M.Band, blocks: M.Blocks, q: torch.Tensor, n_k: int) -> torch.Tensor:
    x = q.nonzero().flatten()
    start = (x // blocks.size) * blocks.size
    lo = start if band.hi is None else torch.maximum(start, x - band.hi)
    hi = start + blocks.size - 1 if band.lo is None else torch.minimum(start + blocks.size - 1, x - band.lo)
    return to_bits(lo, hi, n_k)


@functools.lru_cache(maxsize=8)
def _drawn(m: M.Random, n_q: int, n_k: int) -> torch.Tensor:
    return M.random_blocks(m.count, m.block, m.seed, n_q, n_k)


def _band_in_random(band: M.Band, m: M.Random, q: torch.Tensor, n_k: int) -> torch.Tensor:
    """Per query x, each drawn key block of its query block cut to the band's window [x - hi, x - lo]."""
    chosen = _drawn(m, q.numel(), n_k)
    x = q.nonzero().flatten()
    if not chosen.shape[1] or not x.numel():
        return torch.zeros(n_k, dtype=torch.bool)
    first = chosen[x // m.block] * m.block                      # [queries, count]
    lo = first if band.hi is None else torch.maximum(first, (x - band.hi)[:, None])
    hi = first + m.block - 1 if band.lo is None else torch.minimum(first + m.block - 1, (x - band.lo)[:, None])
    return to_bits(lo.flatten(), hi.flatten(), n_k)


def _random(m: M.Random, q: torch.Tensor, n_k: int) -> torch.Tensor:
    chosen = _drawn(m, q.numel(), n_k)
    qb = torch.unique(q.nonzero().flatten() // m.block)
    kb = torch.unique(chosen[qb].flatten()) if qb.numel() and chosen.shape[1] else torch.zeros(0, dtype=torch.long)
    out = torch.zeros(-(-n_k // m.block) * m.block, dtype=torch.bool).view(-1, m.block)
    out[kb] = True
    return out.flatten()[:n_k]


@functools.lru_cache(maxsize=16)
def _offsets(m: M.Mask, n_q: int, n_k: int) -> torch.Tensor:
    """Bool over d = i - j in [-(n_k - 1), n_q - 1]: the offsets a mask that depends on i - j alone allows."""
    d = torch.arange(-(n_k - 1), n_q)
    return mask_at(m, d.clamp(min=0), (-d).clamp(min=0), (n_q, n_k))


def _correlate(q: torch.Tensor, allowed: torch.Tensor, n_k: int) -> torch.Tensor:
    """out[j] = any_x q[x] and allowed[x - j + n_k - 1] (FFT in float64; counts < 2^53 are exact)."""
    n_q = q.numel()
    size = 1 << (n_q + allowed.numel()).bit_length()
    a = torch.fft.rfft(q.flip(0).double(), size)
    b = torch.fft.rfft(allowed.double(), size)
    full = torch.fft.irfft(a * b, size)
    # (q reversed * allowed)[u] = sum_x q[x] allowed[u - (n_q - 1 - x)]: u = n_q - 1 - j + n_k - 1
    idx = (n_q - 1 + n_k - 1) - torch.arange(n_k)
    return full[idx] > 0.5


def _d_only(m: M.Mask) -> bool:
    p = profile(m)
    return not (p.reason or p.atoms or p.rows or p.cols or p.mixed > 1)


def _by_offsets(m: M.Mask, q: torch.Tensor, n_k: int) -> torch.Tensor:
    """A mask of i - j alone: runs of queries times runs of allowed offsets, or a correlation when many."""
    allowed = _offsets(m, q.numel(), n_k)
    d0, d1 = runs(allowed)
    d0, d1 = d0 - (n_k - 1), d1 - (n_k - 1)
    a, b = runs(q)
    if a.numel() * d0.numel() > 1 << 22:
        return _correlate(q, allowed, n_k)
    lo = (a[:, None] - d1[None, :]).flatten()
    hi = (b[:, None] - d0[None, :]).flatten()
    return to_bits(lo, hi, n_k)


def _banded(m: M.Mask) -> M.Mask:
    """`m` intersected with the band of its zones when it lies inside it (so layouts list only those tiles)."""
    from .contain import inclusion
    p = profile(m)
    if p.reason or p.atoms or not p.zones:
        return m
    band = M.band(min(lo for lo, _ in p.zones), max(hi for _, hi in p.zones))
    inc = inclusion(m, band)
    return M.inter(m, band) if inc.holds and inc.proved else m


@functools.lru_cache(maxsize=16)
def _layout(m: M.Mask, n_q: int, n_k: int):
    return tile_layout(m, n_q, n_k, BLOCK, BLOCK)


def _tiles(m: M.Mask, q: torch.Tensor, n_k: int, runtime) -> torch.Tensor:
    n_q, b = q.numel(), BLOCK
    lay = _layout(m, n_q, n_k) if runtime is None else tile_layout(m, n_q, n_k, b, b, runtime)
    pad = torch.zeros(-(-n_q // b) * b, dtype=torch.bool)
    pad[:n_q] = q
    live = pad.view(-1, b).any(1)
    a, t, cls = lay.row_ids(), lay.col_idx, lay.cls
    use = live[a]
    out = torch.zeros(-(-n_k // b) * b, dtype=torch.bool).view(-1, b)
    out[t[use & (cls == FULL)]] = True
    pa, pt = a[use & (cls != FULL)], t[use & (cls != FULL)]
    keep = ~out[pt].all(1)
    pa, pt = pa[keep], pt[keep]
    ar = torch.arange(b)
    per = max(1, (1 << 20) // (b * b))
    for s in range(0, pa.numel(), per):
        ca, ct = pa[s:s + per], pt[s:s + per]
        i = (ca * b)[:, None, None] + ar[None, :, None]
        j = (ct * b)[:, None, None] + ar[None, None, :]
        ok = mask_at(m, i, j, (n_q, n_k), runtime)
        ok = ok[0] if ok.dim() == 4 else ok
        ok = ok & pad.view(-1, b)[ca][:, :, None] & (j < n_k)
        hit = ok.any(1)                                      # [tiles, b]
        out.index_put_((ct[:, None].expand_as(hit), ar.expand_as(hit)), hit, accumulate=True)
    return out.flatten()[:n_k]


CORE_HOPS = {            # one hop through a primitive, on bool vectors: (mask, queries, n_k) -> keys
    M.Full: lambda m, q, n_k: torch.full((n_k,), bool(q.any()), dtype=torch.bool),
    M.Empty: lambda m, q, n_k: torch.zeros(n_k, dtype=torch.bool),
    M.Band: _band,
    M.Blocks: _blocks,
    M.Random: _random,
}


def _core(m: M.Mask, q: torch.Tensor, n_k: int, runtime) -> torch.Tensor:
    if not q.any():
        return torch.zeros(n_k, dtype=torch.bool)
    if type(m) in CORE_HOPS:
        return CORE_HOPS[type(m)](m, q, n_k)
    pair = {type(p): p for p in m.parts} if isinstance(m, M.Inter) and len(m.parts) == 2 else {}
    if M.Band in pair and pair[M.Band].step == 1 and (M.Blocks in pair or M.Random in pair):
        inside = _band_in_blocks if M.Blocks in pair else _band_in_random
        return inside(pair[M.Band], pair.get(M.Blocks) or pair[M.Random], q, n_k)
    if _d_only(m):
        return _by_offsets(m, q, n_k)
    return _tiles(_banded(m), q, n_k, runtime)


def _filter(factors: list[M.Mask], n: int, axis: str, runtime) -> torch.Tensor:
    m = M.inter(*factors) if factors else M.FULL
    return _filter_cached(m, n, axis) if runtime is None else _filter_at(m, n, axis, runtime)


@functools.lru_cache(maxsize=16)
def _filter_cached(m: M.Mask, n: int, axis: str) -> torch.Tensor:
    return _filter_at(m, n, axis, None)


def _filter_at(m: M.Mask, n: int, axis: str, runtime) -> torch.Tensor:
    idx = torch.arange(n)
    zero = torch.zeros_like(idx)
    ok = mask_at(m, idx, zero, (max(n, 1), max(n, 1)), runtime) if axis == "i" else \
        mask_at(m, zero, idx, (max(n, 1), max(n, 1)), runtime)
    return ok.reshape(-1, n)[0] if ok.dim() > 1 else ok


def _split(factors: list[M.Mask]):
    rows = [f for f in factors if reads(f) <= {"i"}]
    cols = [f for f in factors if reads(f) == {"j"}]
    core = [f for f in factors if reads(f) == {"i", "j"}]
    return rows, cols, core


def _term(factors: list[M.Mask], q: torch.Tensor, n_k: int, runtime) -> torch.Tensor:
    rows, cols, core = _split(factors)
    sel = q & _filter(rows, q.numel(), "i", runtime) if rows else q
    hit = _core(M.inter(*core) if core else M.FULL, sel, n_k, runtime)
    return hit & _filter(cols, n_k, "j", runtime) if cols else hit


def image(m: M.Mask, q: torch.Tensor, n_k: int | None = None, runtime: dict | None = None) -> torch.Tensor:
    """Bool [n_k]: keys some query of `q` (bool [n_q]) may attend to under `m`."""
    n_k = q.numel() if n_k is None else n_k
    out = torch.zeros(n_k, dtype=torch.bool)
    for factors in terms(m):
        out |= _term(factors, q, n_k, runtime)
    return out


def _everything(start, n_k: int):
    return (torch.tensor([0]), torch.tensor([n_k - 1])) if start.numel() and n_k else (start[:0], start[:0])


def _inside(start, end, idx) -> torch.Tensor:
    """The members of the sorted index tensor `idx` that lie in the runs."""
    if not start.numel():
        return idx[:0]
    pos = torch.searchsorted(start, idx, right=True) - 1
    return idx[(pos >= 0) & (end[pos.clamp(min=0)] >= idx)]


def _sorted(idx, n: int) -> torch.Tensor:
    return torch.tensor(sorted(x for x in idx if x < n), dtype=torch.long)


def _term_runs(f: M.Mask, start, end, n_q: int, n_k: int):
    """Keys of one term straight from query runs, for a band (or every key) restricted by index sets of
    rows and columns; None when the term needs bit vectors (or a band is too fragmented for runs)."""
    factors = list(f.parts) if isinstance(f, M.Inter) else [f]
    rows = [x for x in factors if isinstance(x, M.Rows)]
    cols = [x for x in factors if isinstance(x, M.Cols)]
    core = [x for x in factors if not isinstance(x, (M.Rows, M.Cols))]
    if len(core) > 1 or (core and not isinstance(core[0], (M.Band, M.Full, M.Empty))):
        return None
    for r in rows:
        start = end = _inside(start, end, _sorted(r.idx, n_q))
    core = core[0] if core else M.FULL
    if isinstance(core, M.Band):
        got = band_runs(start, end, core.lo, core.hi, core.step, n_k)
    else:
        got = _everything(start, n_k) if isinstance(core, M.Full) else (start[:0], end[:0])
    if got is None:
        return None
    for c in cols:
        got = (_inside(*got, _sorted(c.idx, n_k)),) * 2
    return got


def image_runs(m: M.Mask, start: torch.Tensor, end: torch.Tensor, n_q: int, n_k: int, runtime=None):
    """`image` on runs of queries, giving runs of keys: bands and index sets on the runs themselves (O(runs)),
    other terms through bool vectors."""
    outs_s, outs_e, bits = [], [], None
    parts = [(M.inter(*factors), factors) for factors in terms(m)]
    for whole, factors in sorted(parts, key=lambda p: not isinstance(p[0], (M.Band, M.Rows, M.Cols))):
        got = _term_runs(whole, start, end, n_q, n_k)
        if got is None:
            bits = to_bits(start, end, n_q) if bits is None else bits
            got = runs(_term(factors, bits, n_k, runtime))
        outs_s.append(got[0])
        outs_e.append(got[1])
        if got[0].numel() == 1 and int(got[0][0]) == 0 and int(got[1][0]) == n_k - 1:
            break                                   # every key already
    if not outs_s:
        return start[:0], end[:0]
    return merge(torch.cat(outs_s), torch.cat(outs_e), n_k)
