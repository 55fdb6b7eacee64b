"""The mask algebra: which (query i, key j) pairs interact, as immutable values in a normal form.

Primitives lower to a few canonical nodes: `Band(lo, hi, step)` covers sliding, window, causal and strided
(`lo <= i - j <= hi` and `(i - j) % step == 0`, None = unbounded); `Rows`/`Cols` cover global, rows and cols;
`Blocks`, `Random`, `Same` and `Where` stand alone. The smart constructors `union`, `inter` and `complement`
flatten, sort, deduplicate and fold constants, intersect bands in closed form and merge index sets, so equal
patterns written differently get equal, hashable values (used as cache keys).

>>> sliding(2) | CAUSAL == union(CAUSAL, sliding(2))
True
>>> inter(CAUSAL, sliding(256))
Band(lo=0, hi=256, step=1)
>>> global_({0}) == union(Rows(frozenset({0})), Cols(frozenset({0})))
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union as _U

from .predicate import Pred


class Mask:
    """Base class: masks combine with `|`, `&`, `~` and `-` like the language."""

    def __or__(self, other: "Mask") -> "Mask":
        return union(self, other)

    def __and__(self, other: "Mask") -> "Mask":
        return inter(self, other)

    def __invert__(self) -> "Mask":
        return complement(self)

    def __sub__(self, other: "Mask") -> "Mask":
        return inter(self, complement(other))

    def sort_key(self) -> str:
        return repr(self)


@dataclass(frozen=True, repr=True)
class Full(Mask):
    """Every pair."""


@dataclass(frozen=True, repr=True)
class Empty(Mask):
    """No pair."""


@dataclass(frozen=True, repr=True)
class Band(Mask):
    """`lo <= i - j <= hi` (None: unbounded) and `(i - j) % step == 0`."""
    lo: int | None
    hi: int | None
    step: int = 1


@dataclass(frozen=True, repr=True)
class Rows(Mask):
    """`i in idx`: these queries see every key (the row half of `global`)."""
    idx: frozenset


@dataclass(frozen=True, repr=True)
class Cols(Mask):
    """`j in idx`: every query sees these keys (the column half of `global`)."""
    idx: frozenset


@dataclass(frozen=True, repr=True)
class Blocks(Mask):
    """`i // size == j // size`: block-diagonal."""
    size: int


@dataclass(frozen=True, repr=True)
class Random(Mask):
    """`count` key blocks of `block` keys per query block of `block` queries, drawn by `random_blocks`."""
    count: int
    block: int
    seed: int


@dataclass(frozen=True, repr=True)
class Same(Mask):
    """`ids[i] == ids[j]` for a runtime tensor `ids` passed to the op under this name."""
    name: str


@dataclass(frozen=True, repr=True)
class Where(Mask):
    """Any predicate over i and j."""
    pred: Pred


@dataclass(frozen=True, repr=True)
class Union(Mask):
    parts: tuple


@dataclass(frozen=True, repr=True)
class Inter(Mask):
    parts: tuple


@dataclass(frozen=True, repr=True)
class Not(Mask):
    part: Mask


MaskT = _U[Full, Empty, Band, Rows, Cols, Blocks, Random, Same, Where, Union, Inter, Not]
FULL, EMPTY = Full(), Empty()
CAUSAL = Band(0, None, 1)


# ------------------------------------------------------------------------------------------- constructors
def band(lo: int | None, hi: int | None, step: int = 1) -> Mask:
    """A canonical band: bounds snapped to multiples of step; empty and full bands folded."""
    if step < 1:
        raise ValueError("band step must be >= 1")
    if lo is not None:
        lo = -((-lo) // step) * step  # ceil to a multiple of step
    if hi is not None:
        hi = (hi // step) * step
    if lo is not None and hi is not None and lo > hi:
        return EMPTY
    if lo is None and hi is None and step == 1:
        return FULL
    return Band(lo, hi, step)


def sliding(width: int, dilation: int = 1) -> Mask:
    return band(-width * dilation, width * dilation, dilation)


def window(before: int, after: int, dilation: int = 1) -> Mask:
    return band(-after * dilation, before * dilation, dilation)


def strided(stride: int) -> Mask:
    return band(None, None, stride)


def global_(idx) -> Mask:
    idx = frozenset(idx)
    return union(Rows(idx), Cols(idx)) if idx else EMPTY


def rows(idx) -> Mask:
    idx = frozenset(idx)
    return Rows(idx) if idx else EMPTY


def cols(idx) -> Mask:
    idx = frozenset(idx)
    return Cols(idx) if idx else EMPTY


def blocks(size: int) -> Mask:
    return band(0, 0) if size == 1 else Blocks(size)


def _flatten(kind, parts):
    out = []
    for p in parts:
        out.extend(p.parts if isinstance(p, kind) else (p,))
    return out


def _canon(kind, parts: list) -> Mask:
    uniq = sorted(set(parts), key=lambda m: m.sort_key())
    if not uniq:
        return FULL if kind is Inter else EMPTY
    return uniq[0] if len(uniq) == 1 else kind(tuple(uniq))


def _covers(a: Band, b: Band) -> bool:
    """Every pair of band b is in band a (b's offsets are multiples of b.step, hence of a.step)."""
    return (b.step % a.step == 0 and (a.lo is None or (b.lo is not None and b.lo >= a.lo))
            and (a.hi is None or (b.hi is not None and b.hi <= a.hi)))


def _joined(a: Band, b: Band) -> Mask | None:
    """a | b as one band when it is one (same step, overlapping or touching on the lattice), else None."""
    if a.step != b.step:
        return None
    inf = float("inf")
    lo_a, lo_b = (-inf if a.lo is None else a.lo), (-inf if b.lo is None else b.lo)
    hi_a, hi_b = (inf if a.hi is None else a.hi), (inf if b.hi is None else b.hi)
    if max(lo_a, lo_b) > min(hi_a, hi_b) + a.step:
        return None
    lo = None if a.lo is None or b.lo is None else min(a.lo, b.lo)
    hi = None if a.hi is None or b.hi is None else max(a.hi, b.hi)
    return band(lo, hi, a.step)


def _union_bands(bands: list[Band]) -> list[Mask]:
    """Bands merged while any two are one band (`sliding(1) | sliding(2)` is `sliding(2)`)."""
    out = list(dict.fromkeys(bands))
    merged = True
    while merged and len(out) > 1:
        merged = False
        for x in range(len(out)):
            for y in range(len(out)):
                if x == y:
                    continue
                a, b = out[x], out[y]
                one = a if _covers(a, b) else _joined(a, b)
                if one is not None:
                    out = [m for k, m in enumerate(out) if k not in (x, y)] + [one]
                    merged = True
                    break
            if merged:
                break
    return out


def union(*parts: Mask) -> Mask:
    """`a | b | ...` in normal form (bands that form one band merge; row/col sets unite)."""
    flat = [p for p in _flatten(Union, parts) if not isinstance(p, Empty)]
    if any(isinstance(p, Full) for p in flat):
        return FULL
    bands = _union_bands([p for p in flat if isinstance(p, Band)])
    if any(isinstance(b, Full) for b in bands):
        return FULL
    flat = [p for p in flat if not isinstance(p, Band)] + bands
    rows_, cols_ = frozenset(), frozenset()
    rest = []
    for p in flat:
        if isinstance(p, Rows):
            rows_ |= p.idx
        elif isinstance(p, Cols):
            cols_ |= p.idx
        else:
            rest.append(p)
    rest += [Rows(rows_)] if rows_ else []
    rest += [Cols(cols_)] if cols_ else []
    uniq = set(rest)
    if any(Not(p) in uniq for p in uniq):
        return FULL
    return _canon(Union, rest)


def _inter_bands(bands: list[Band]) -> Mask:
    lo = max((b.lo for b in bands if b.lo is not None), default=None)
    hi = min((b.hi for b in bands if b.hi is not None), default=None)
    step = 1
    for b in bands:
        step = step * b.step // math.gcd(step, b.step)
    return band(lo, hi, step)


def inter(*parts: Mask) -> Mask:
    """`a & b & ...` in normal form (bands intersect in closed form; row/col sets intersect)."""
    flat = [p for p in _flatten(Inter, parts) if not isinstance(p, Full)]
    if any(isinstance(p, Empty) for p in flat):
        return EMPTY
    bands = [p for p in flat if isinstance(p, Band)]
    rest = [p for p in flat if not isinstance(p, Band)]
    if bands:
        b = _inter_bands(bands)
        if isinstance(b, Empty):
            return EMPTY
        if not isinstance(b, Full):
            rest.append(b)
    for kind in (Rows, Cols):
        sets = [p.idx for p in rest if isinstance(p, kind)]
        if len(sets) > 1:
            common = frozenset.intersection(*sets)
            if not common:
                return EMPTY
            rest = [p for p in rest if not isinstance(p, kind)] + [kind(common)]
    uniq = set(rest)
    if any(Not(p) in uniq for p in uniq):
        return EMPTY
    return _canon(Inter, rest)


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


def random_blocks(count: int, block: int, seed: int, n_q: int, n_k: int):
    """The key blocks of `random(count, block, seed)`: a LongTensor [ceil(n_q/block), min(count, n_kb)].

    Row `a` holds distinct key-block indices drawn uniformly for query block `a` (Floyd's sampling,
    vectorised over query blocks: O(n_qb * count^2), no n_qb x n_kb table), reproducible from the seed and
    the sizes. This one function defines `random` for the reference, the layouts and every backend.
    """
    import torch
    n_qb, n_kb = -(-n_q // block), -(-n_k // block)
    c = min(count, n_kb)
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.empty(n_qb, 0, dtype=torch.long)
    for t in range(n_kb - c, n_kb):
        x = (torch.rand(n_qb, generator=g, dtype=torch.float64) * (t + 1)).long().clamp_(max=t)
        dup = (chosen == x[:, None]).any(dim=1)
        chosen = torch.cat([chosen, torch.where(dup, torch.full_like(x, t), x)[:, None]], dim=1)
    return chosen


# ---------------------------------------------------------------------------------------------- queries
def children(m: Mask) -> tuple:
    if isinstance(m, (Union, Inter)):
        return m.parts
    if isinstance(m, Not):
        return (m.part,)
    return ()


def walk(m: Mask):
    """Every node of a mask, parents first."""
    stack = [m]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def runtime_inputs(m: Mask) -> tuple[str, ...]:
    """Names of the runtime tensors a mask reads (`same(ids)`)."""
    return tuple(sorted({n.name for n in walk(m) if isinstance(n, Same)}))


def is_causal(m: Mask) -> bool:
    return m == CAUSAL


def _band_source(m: Band) -> str:
    d = m.step
    if m == CAUSAL:
        return "causal"
    if m.lo is not None and m.hi is not None and m.lo <= 0 <= m.hi:
        before, after = m.hi // d, -m.lo // d
        dil = f", {d}" if d > 1 else ""
        return f"sliding({before}{dil})" if before == after else f"window({before}, {after}{dil})"
    if m.lo is None and m.hi is None:
        return f"strided({d})"
    conds = ([f"i - j >= {m.lo}"] if m.lo is not None else []) + ([f"i - j <= {m.hi}"] if m.hi is not None else [])
    if d > 1:
        conds.append(f"(i - j) % {d} == 0")
    return f"where({' and '.join(conds)})"


def to_source(m: Mask) -> str:
    """The mask as `.attn` text (an equivalent spelling of the normal form)."""
    if isinstance(m, Full):
        return "full"
    if isinstance(m, Empty):
        return "empty"
    if isinstance(m, Band):
        return _band_source(m)
    if isinstance(m, (Rows, Cols)):
        name = "rows" if isinstance(m, Rows) else "cols"
        idx = sorted(m.idx)
        if len(idx) > 3 and idx[-1] - idx[0] + 1 == len(idx):
            return f"{name}(range({idx[0]}, {idx[-1] + 1}))"
        return f"{name}({{{', '.join(map(str, idx))}}})"
    if isinstance(m, Blocks):
        return f"blocks({m.size})"
    if isinstance(m, Random):
        return f"random({m.count}, {m.block}, {m.seed})"
    if isinstance(m, Same):
        return f"same({m.name})"
    if isinstance(m, Where):
        return f"where({m.pred})"
    if isinstance(m, Union):
        return " | ".join(to_source(p) if not isinstance(p, Union) else f"({to_source(p)})" for p in m.parts)
    if isinstance(m, Inter):
        return " & ".join(f"({to_source(p)})" if isinstance(p, (Union, Inter)) else to_source(p) for p in m.parts)
    if isinstance(m, Not):
        inner = to_source(m.part)
        return f"~({inner})" if isinstance(m.part, (Union, Inter)) else f"~{inner}"
    raise TypeError(f"not a mask: {m!r}")
