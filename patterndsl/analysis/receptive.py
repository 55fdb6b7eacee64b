"""Receptive fields across layers: which input tokens can influence a query token after each layer.

A layer is one application of a program. Its *dependence* maps an output position to the input positions it
reads: through each stage, a position reads its query row and the keys its mask allows, and those keys'
own dependence (Luna's unpack reads packed rows, which read the input); per-head programs read the union of
their heads. With the residual stream (default) a position also reads itself. The field of query q after
layer l is `D_1(D_2(... D_l({q})))`, one hop per layer through `hops.image` on bool vectors of N tokens:
no N x N matrix at any N. For one pattern repeated, the depth at which q sees token 0 is searched past the
last layer too: in closed form for a band (a layer moves at most `hi` tokens back), else layer by layer
until the field stops growing.

Longformer's argument (Beltagy et al. 2020, §3.1): l layers of a window w on each side reach l*w tokens
back, and with dilation d, l*d*w:

>>> r = reach("sliding(4)", layers=3, n=64)
>>> [r.span(l) for l in (1, 2, 3)], r.depth
([(59, 63), (55, 63), (51, 63)], 16)
>>> reach("sliding(4, 2)", layers=3, n=64).span(3)
(39, 63)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import INPUT, ProgramIR
from .hops import image_runs
from .intervals import merge, to_bits
from .subjects import describe, rows_of, subject

DEFAULT_MAX_DEPTH = 4096
MAX_N = 1 << 24           # fields are bool vectors and runs of N tokens


# ---------------------------------------------------------------------------------------------- relations
@dataclass(frozen=True)
class Identity:
    """A position reads itself."""


@dataclass(frozen=True)
class Nothing:
    """Reads no input token (a learned param)."""


@dataclass(frozen=True)
class Hop:
    """Queries read the keys `mask` allows (keys of length `keys` rows, None: N), then through `then`."""
    mask: M.Mask
    then: object
    keys: int | None = None


@dataclass(frozen=True)
class AnyOf:
    parts: tuple


def apply(rel, field: tuple, n_rows: int, n: int, runtime=None) -> tuple:
    """Runs of the input tokens (of N = n) that the positions in `field` (runs over `n_rows` rows) read."""
    start, end = field
    if isinstance(rel, Identity):
        return field
    if isinstance(rel, Nothing):
        return start[:0], end[:0]
    if isinstance(rel, Hop):
        n_k = n if rel.keys is None else rel.keys
        return apply(rel.then, image_runs(rel.mask, start, end, n_rows, n_k, runtime), n_k, n, runtime)
    parts = [apply(p, field, n_rows, n, runtime) for p in rel.parts]
    return merge(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), n)


def _deps(ir: ProgramIR, name: str):
    params = dict(ir.params)
    if name == INPUT:
        return Identity()
    if name in params:
        return Nothing()
    st = ir.stage(name)
    rows = rows_of(ir, st.keys)
    keys = None if rows == INPUT else params[rows]
    return AnyOf((_deps(ir, st.query), Hop(st.mask, _deps(ir, st.keys), keys)))


def layer_relation(x, residual: bool = True):
    """The dependence of one layer of `x` (a program IR or a mask), as a relation tree."""
    if isinstance(x, M.Mask):
        rel = Hop(x, Identity())
        return AnyOf((Identity(), rel)) if residual else rel
    outs = [o for o in x.outputs if rows_of(x, o) == INPUT]
    if not outs:
        raise PatternError(f"{x.name} returns no token sequence (every output has a param's rows)")
    parts = tuple(_deps(x, o) for o in outs)
    return AnyOf(((Identity(),) if residual else ()) + parts)


def _single_band(rel) -> M.Band | None:
    """The band of a layer that is exactly `itself | band` (or a band holding the diagonal), when its
    backward offsets leave no gap after the diagonal (so `band_depth` applies)."""
    band = _one_band(rel)
    return band if band is not None and (band.lo is None or band.lo <= band.step) else None


def _one_band(rel) -> M.Band | None:
    if isinstance(rel, Hop):
        plain = isinstance(rel.mask, M.Band) and isinstance(rel.then, Identity) and rel.keys is None
        return rel.mask if plain else None
    if isinstance(rel, AnyOf):
        hops = [p for p in rel.parts if not isinstance(p, Identity)]
        return _one_band(hops[0]) if len(hops) == 1 else None
    return None


def band_depth(band: M.Band, q: int) -> int | None:
    """Layers of `itself | band` after which position q reads token 0 (None: never), in closed form, for a
    band whose backward offsets start at most one step from the diagonal (lo <= step): each layer moves
    back by at most `hi` on the lattice of the step, and every multiple of the step up to `hi` is one move."""
    s = band.step
    if band.lo is not None and band.lo > s:
        raise ValueError(f"band_depth needs lo <= step, got {band}")
    if q == 0:
        return 0
    if q % s or (band.hi is not None and band.hi < s):
        return None
    return 1 if band.hi is None else -(-q // band.hi)


# ------------------------------------------------------------------------------------------------- result
@dataclass
class Reach:
    """Fields of `query` after each layer (as runs of tokens), and `depth`: the layers after which the query
    reads token 0 (None: never, or not within `depth_note`)."""
    n: int
    query: int
    labels: list[str]
    residual: bool
    runs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    depth: int | None = None
    depth_note: str = ""

    def keys(self, layer: int) -> torch.Tensor:
        """Bool [n]: the tokens that can influence the query after `layer` layers (1-based)."""
        return to_bits(*self.runs[layer - 1], self.n)

    def count(self, layer: int) -> int:
        a, b = self.runs[layer - 1]
        return int((b - a + 1).sum())

    def span(self, layer: int) -> tuple[int, int] | None:
        a, b = self.runs[layer - 1]
        return (int(a[0]), int(b[-1])) if a.numel() else None

    def bar(self, layer: int, width: int = 64) -> str:
        cell = -(-self.n // width)
        bits = torch.zeros(cell * width, dtype=torch.float32)
        bits[:self.n] = self.keys(layer).float()
        valid = torch.zeros(cell * width)
        valid[:self.n] = 1
        frac = bits.view(width, cell).sum(1) / valid.view(width, cell).sum(1).clamp(min=1)
        cols = valid.view(width, cell).sum(1) > 0
        return "".join("#" if f == 1 else "+" if f > 0 else "." for f, c in zip(frac.tolist(), cols.tolist()) if c)

    def __str__(self) -> str:
        return render(self)


def render(r: Reach, width: int = 64) -> str:
    """The fields as a table with one bar per layer (`#` every token of the cell, `+` some, `.` none)."""
    cell = -(-r.n // width)
    head = (f"reach of query {r.query} (N = {r.n}), {len(r.runs)} layer{'s' * (len(r.runs) != 1)}"
            f"{', residual stream included' if r.residual else ''}; 1 char = {cell} token{'s' * (cell > 1)}")
    lines = [head, f"{'layer':>5}  {'tokens':>9}  {'share':>7}  {'span':>19}  {'runs':>5}  pattern"]
    for l in range(1, len(r.runs) + 1):
        sp = r.span(l)
        span = f"[{sp[0]}, {sp[1]}]" if sp else "-"
        lines.append(f"{l:>5}  {r.count(l):>9}  {100 * r.count(l) / r.n:>6.2f}%  {span:>19}  "
                     f"{r.runs[l - 1][0].numel():>5}  {r.labels[l - 1]}")
        lines.append(f"{'':>5}  {r.bar(l, width)}")
    lines.append(r.depth_note)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- public
def _layers(patterns, layers, params):
    items = list(patterns) if isinstance(patterns, (list, tuple)) else [patterns]
    if not items:
        raise PatternError("reach needs at least one pattern")
    if layers is None:
        layers = len(items)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise PatternError(f"layers must be an int >= 1, got {layers!r}")
    if len(items) not in (1, layers):
        raise PatternError(f"{len(items)} patterns for {layers} layers",
                           hint="give one pattern (repeated) or one pattern per layer")
    subjects = [subject(x, params) for x in items]
    return subjects * layers if len(subjects) == 1 else subjects, layers


def _same(f, g) -> bool:
    return torch.equal(f[0], g[0]) and torch.equal(f[1], g[1])


def _key(field) -> bytes:
    """A digest of a field (runs), to notice when fields repeat."""
    return hashlib.sha1(field[0].numpy().tobytes() + b"|" + field[1].numpy().tobytes()).digest()


def _has_zero(field) -> bool:
    return bool(field[0].numel()) and int(field[0][0]) == 0


def _depth(r: Reach, rels, fields, max_depth: int, n: int, runtime) -> None:
    hit = next((l for l, f in enumerate(fields, 1) if _has_zero(f)), None)
    if hit is not None or r.query == 0:
        r.depth = 0 if r.query == 0 else hit
        r.depth_note = f"query {r.query} reads token 0 after {r.depth} layer{'s' * (r.depth != 1)}"
        return
    if len(set(rels)) > 1:
        r.depth_note = f"query {r.query} does not read token 0 within these {len(rels)} layers"
        return
    band = _single_band(rels[0])
    if band is not None:
        r.depth = band_depth(band, r.query)
        r.depth_note = (f"query {r.query} reads token 0 after {r.depth} layers (closed form for {M.to_source(band)})"
                        if r.depth is not None else f"query {r.query} never reads token 0 (closed form for {M.to_source(band)})")
        return
    f, seen = fields[-1], {_key(f) for f in fields}
    for l in range(len(rels) + 1, max_depth + 1):
        g = apply(rels[0], f, n, n, runtime)
        if _has_zero(g):
            r.depth, r.depth_note = l, f"query {r.query} reads token 0 after {l} layers"
            return
        if _key(g) in seen:              # the fields repeat from here on (a fixed point, or a cycle without
            what = "stops growing" if _same(g, f) else "repeats"            # the residual stream)
            r.depth_note = f"query {r.query} never reads token 0 (its field {what} after {l - 1} layers)"
            return
        seen.add(_key(g))
        f = g
    r.depth_note = f"query {r.query} does not read token 0 within {max_depth} layers"


def reach(patterns, layers: int | None = None, n: int = 4096, query: int | None = None, residual: bool = True,
          max_depth: int = DEFAULT_MAX_DEPTH, runtime: dict | None = None, **params) -> Reach:
    """Receptive fields of token `query` (default N - 1) through `layers` layers of `patterns`: one pattern
    (repeated) or one per layer; each a mask, a mask expression, or a program (anything `pd.compile` takes),
    with `params` overriding program parameters. `runtime` gives ids for `same(...)` masks ([1, N] or [N])."""
    subjects, layers = _layers(patterns, layers, params or None)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise PatternError(f"the sequence length N must be an int in 1..{MAX_N}, got {n!r}")
    query = n - 1 if query is None else query
    if not isinstance(query, int) or not 0 <= query < n:
        raise PatternError(f"the query must be a token index in 0..{n - 1}, got {query!r}")
    for s in subjects:
        needs = M.runtime_inputs(s) if isinstance(s, M.Mask) else [x for st in s.stages
                                                                     for x in M.runtime_inputs(st.mask)]
        missing = [x for x in needs if x not in (runtime or {})]
        if missing:
            raise PatternError(f"{describe(s)} reads runtime ids {missing[0]}: reach needs them",
                               hint=f"pass runtime={{'{missing[0]}': ids}} with ids a LongTensor [N]")
    runtime = {k: (v if v.dim() == 2 else v[None]) for k, v in runtime.items()} if runtime else None
    rels = [layer_relation(s, residual) for s in subjects]
    r = Reach(n, query, [describe(s) for s in subjects], residual)
    start = (torch.tensor([query]), torch.tensor([query]))
    fields = []
    for l in range(1, layers + 1):
        if len(set(rels)) == 1 and len(fields) >= 2 and _same(fields[-1], fields[-2]):
            f = fields[-1]                                    # a fixed point: every later layer is the same
        elif len(set(rels)) == 1 and fields:
            f = apply(rels[0], fields[-1], n, n, runtime)
        else:
            f = start
            for rel in reversed(rels[:l]):
                f = apply(rel, f, n, n, runtime)
        fields.append(f)
    r.runs = fields
    _depth(r, rels, fields, max_depth, n, runtime)
    return r
