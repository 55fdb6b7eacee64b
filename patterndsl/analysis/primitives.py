"""Per-primitive facts the analyses need, one function per mask node type in a table.

`profile(m)`: the cases that decide `m` for every N (see `profile.py`); `substitute(m, values)`: `m` with
free leaves (`same`, `random`) replaced by fixed masks; `reads(m)`: which of `i`, `j` a mask depends on.

>>> from patterndsl.ir import mask as M
>>> profile(M.sliding(2) | M.cols({3})).zones, profile(M.sliding(2) | M.cols({3})).cols
(((-2, -2), (2, 2)), ((3, 3),))
>>> reads(M.rows({1}) | M.Where(P.Cmp("<", P.I, P.Const(4))))
frozenset({'i'})
"""
from __future__ import annotations

from ..ir import mask as M
from ..ir import predicate as P
from .affine import where_profile
from .profile import Profile, runs


def _band(m: M.Band) -> Profile:
    zones = tuple((x, x) for x in (m.lo, m.hi) if x is not None)
    return Profile(period=m.step, zones=zones)


def _blocks(m: M.Blocks) -> Profile:
    return Profile(mixed=m.size, zones=((-m.size + 1, m.size - 1),))


PROFILES = {
    M.Full: lambda m: Profile(),
    M.Empty: lambda m: Profile(),
    M.Band: _band,
    M.Rows: lambda m: Profile(rows=runs(m.idx)),
    M.Cols: lambda m: Profile(cols=runs(m.idx)),
    M.Blocks: _blocks,
    M.Random: lambda m: Profile(atoms=frozenset({m})),
    M.Same: lambda m: Profile(atoms=frozenset({m}), zones=((0, 0),)),   # same(i, i) always holds
    M.Where: lambda m: where_profile(m.pred),
    M.Union: lambda m: Profile(),
    M.Inter: lambda m: Profile(),
    M.Not: lambda m: Profile(),
}


def profile(m: M.Mask) -> Profile:
    """The merged profile of every node of `m`."""
    out = Profile()
    for node in M.walk(m):
        out = out.merge(PROFILES[type(node)](node))
    return out


def rebuild(m: M.Mask, leaf) -> M.Mask:
    """`m` with every leaf replaced by `leaf(node)` (None keeps it), recombined through the smart constructors."""
    if isinstance(m, M.Union):
        return M.union(*(rebuild(p, leaf) for p in m.parts))
    if isinstance(m, M.Inter):
        return M.inter(*(rebuild(p, leaf) for p in m.parts))
    if isinstance(m, M.Not):
        return M.complement(rebuild(m.part, leaf))
    new = leaf(m)
    return m if new is None else new


def fixed(atom: M.Mask, value: bool) -> M.Mask:
    """A free leaf with a fixed value off the diagonal: `same` true (all ids equal) or only on the diagonal
    (all ids distinct); `random` every block or none."""
    if isinstance(atom, M.Same):
        return M.FULL if value else M.band(0, 0)
    return M.FULL if value else M.EMPTY


def substitute(m: M.Mask, values: dict) -> M.Mask:
    """`m` with the free leaves in `values` (leaf -> bool) fixed by `fixed`."""
    return rebuild(m, lambda node: fixed(node, values[node]) if node in values else None)


def _reads_where(m: M.Where) -> frozenset:
    return frozenset(P.uses(m.pred))


READS = {
    M.Full: lambda m: frozenset(),
    M.Empty: lambda m: frozenset(),
    M.Rows: lambda m: frozenset("i"),
    M.Cols: lambda m: frozenset("j"),
    M.Where: _reads_where,
}


def reads(m: M.Mask) -> frozenset:
    """The index variables `m` depends on: {'i'} for row filters, {'j'} for column filters."""
    out = frozenset()
    for node in M.walk(m):
        if not isinstance(node, (M.Union, M.Inter, M.Not)):
            out |= READS.get(type(node), lambda _: frozenset("ij"))(node)
    return out
