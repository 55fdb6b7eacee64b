"""Where-predicates as affine-periodic forms: which ones are decidable for every N, and their breakpoints.

An integer subexpression of a `where` is written `e(i, j) = a*i + b*j + p(i, j)` with rational `a`, `b` and a
bounded part `p` that is periodic in `i` and in `j` (period `period`; `d_only` when `p` depends on `i - j`
alone). `i // k` and `i % k` by a constant stay in this form (`i // 64 = i/64 - (i % 64)/64`); `abs`, `min`,
`max` split into pieces guarded by comparisons. Every comparison then compares a form with 0, and it is one of:

- periodic (`a = b = 0`): a function of `i mod P` and `j mod P`;
- a threshold on `d = i - j` (`a = -b`): constant outside a *zone* of `d` whose width is `(hi - lo) / |a|`;
- a threshold on `i` (`b = 0`) or on `j` (`a = 0`): constant beyond a *window* of rows or columns.

Anything else (`j <= 2 * i`, `i * j < 5`) is outside the fragment, and `where_profile` says why. Inside it,
the predicate is fixed by finitely many cases (`profile.py` turns them into witness points).

>>> from patterndsl.ir.predicate import Bin, Call, Cmp, Const, I, J
>>> prof = where_profile(Cmp("<=", Call("abs", (Bin("-", I, J),)), Const(4)))     # abs(i - j) <= 4
>>> prof.zones, prof.period, prof.reason
(((-1, 1), (3, 5), (-5, -3)), 1, None)
>>> where_profile(Cmp("<=", J, Bin("*", Const(2), I))).reason
'where(j <= 2 * i): `-2*i + j` mixes i and j other than through i - j'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

from ..ir import predicate as P
from .profile import Profile

MAX_PIECES = 64        # pieces an abs/min/max expansion may reach before we give up


class Unsupported(Exception):
    """The predicate is outside the affine-periodic fragment (the message says where)."""


@dataclass(frozen=True)
class Form:
    """`a*i + b*j + p` with `lo <= p <= hi`, `p` periodic with `period` (in `i - j` alone if `d_only`)."""
    a: Fraction
    b: Fraction
    lo: Fraction
    hi: Fraction
    period: int = 1
    d_only: bool = True

    @property
    def constant(self) -> bool:
        return self.a == 0 and self.b == 0 and self.lo == self.hi

    def __str__(self) -> str:
        terms = [(self.a, "i"), (self.b, "j")]
        text = " + ".join(f"{_coef(c)}{v}" for c, v in terms if c)
        if self.lo == self.hi and self.lo:
            text += f" + {self.lo}"
        elif self.lo != self.hi:
            text += " + p"
        return (text or "0").replace("+ -", "- ")


def _coef(c: Fraction) -> str:
    return "" if c == 1 else "-" if c == -1 else f"{c}*"


def const(c) -> Form:
    c = Fraction(c)
    return Form(Fraction(0), Fraction(0), c, c)


def add(x: Form, y: Form) -> Form:
    return Form(x.a + y.a, x.b + y.b, x.lo + y.lo, x.hi + y.hi, _lcm(x.period, y.period), x.d_only and y.d_only)


def scale(x: Form, c: Fraction) -> Form:
    lo, hi = sorted((x.lo * c, x.hi * c))
    return Form(x.a * c, x.b * c, lo, hi, x.period, x.d_only)


def _lcm(*xs: int) -> int:
    out = 1
    for x in xs:
        out = out * x // math.gcd(out, x)
    return out


def _div_period(x: Form, k: int) -> int:
    """A period T of `x // k` and `x % k`: T a multiple of x's period with a*T/k and b*T/k integers."""
    return _lcm(x.period, (x.a / k).denominator, (x.b / k).denominator)


def floordiv(x: Form, k: int) -> Form:
    """`x // k` for a constant k (Python floor; `x // 0 == 0`)."""
    if k == 0:
        return const(0)
    if x.constant:
        return const(int(x.lo) // k)
    lo, hi = sorted((x.lo / k, x.hi / k))
    frac = Fraction(abs(k) - 1, abs(k))           # x/k - x//k lies in [0, frac]
    return Form(x.a / k, x.b / k, lo - frac, hi, _div_period(x, k), x.d_only and x.a + x.b == 0)


def mod(x: Form, k: int) -> Form:
    """`x % k` for a constant k (the sign of k; `x % 0 == 0`)."""
    if k == 0:
        return const(0)
    if x.constant:
        return const(int(x.lo) % k)
    lo, hi = (Fraction(0), Fraction(k - 1)) if k > 0 else (Fraction(k + 1), Fraction(0))
    return Form(Fraction(0), Fraction(0), lo, hi, _div_period(x, k), x.d_only and x.a + x.b == 0)


# --------------------------------------------------------------------------------------------- expansion
class _Collector:
    """Walks a predicate: integer expressions become lists of pieces, comparisons become atoms."""

    def __init__(self):
        self.atoms: list[Form] = []

    def condition(self, p) -> None:
        if isinstance(p, P.Cmp):
            for x in self.pieces(p.a):
                for y in self.pieces(p.b):
                    self.atoms.append(add(x, scale(y, Fraction(-1))))
        elif isinstance(p, P.Logic):
            self.condition(p.a)
            if p.b is not None:
                self.condition(p.b)
        elif not (isinstance(p, P.Const) and isinstance(p.value, bool)):
            self.atoms.extend(self.pieces(p))      # a number used as a condition: true where nonzero

    def pieces(self, p) -> list[Form]:
        if isinstance(p, P.Var):
            one, zero = Fraction(1), Fraction(0)
            return [Form(one, zero, zero, zero) if p.name == "i" else Form(zero, one, zero, zero)]
        if isinstance(p, P.Const):
            return [const(int(p.value))]
        if isinstance(p, P.Bin):
            return self._bin(p.op, self.pieces(p.a), self.pieces(p.b), p)
        if isinstance(p, P.Call):
            return self._call(p.func, [self.pieces(a) for a in p.args])
        raise Unsupported(f"`{p}` is a condition used as a number")

    def _bin(self, op, xs, ys, p) -> list[Form]:
        if op in ("+", "-"):
            sign = Fraction(1 if op == "+" else -1)
            return _capped([add(x, scale(y, sign)) for x in xs for y in ys])
        if op == "*":
            return _capped([_mul(x, y, p) for x in xs for y in ys])
        if len(ys) != 1 or not ys[0].constant:
            raise Unsupported(f"`{p}` divides by a non-constant")
        k = int(ys[0].lo)
        return [floordiv(x, k) if op == "//" else mod(x, k) for x in xs]

    def _call(self, func, args) -> list[Form]:
        if func == "abs":
            out = []
            for x in args[0]:
                if x.a == 0 and x.b == 0:
                    out.append(_abs_periodic(x))
                else:
                    self.atoms.append(x)
                    out += [x, scale(x, Fraction(-1))]
            return _capped(out)
        xs, ys = args
        for x in xs:
            for y in ys:
                self.atoms.append(add(x, scale(y, Fraction(-1))))
        return _capped(xs + ys)


def _mul(x: Form, y: Form, p) -> Form:
    if y.constant:
        return scale(x, y.lo)
    if x.constant:
        return scale(y, x.lo)
    if x.a == x.b == y.a == y.b == 0:               # two bounded periodic parts: a bounded periodic product
        corners = [u * v for u in (x.lo, x.hi) for v in (y.lo, y.hi)]
        return Form(Fraction(0), Fraction(0), min(corners), max(corners), _lcm(x.period, y.period),
                    x.d_only and y.d_only)
    raise Unsupported(f"`{p}` multiplies two expressions in i or j")


def _abs_periodic(x: Form) -> Form:
    if x.lo >= 0:
        return x
    if x.hi <= 0:
        return scale(x, Fraction(-1))
    return replace(x, lo=Fraction(0), hi=max(-x.lo, x.hi))


def _capped(forms: list[Form]) -> list[Form]:
    out = list(dict.fromkeys(forms))
    if len(out) > MAX_PIECES:
        raise Unsupported(f"abs/min/max split the predicate into more than {MAX_PIECES} pieces")
    return out


# ------------------------------------------------------------------------------------------------ atoms
def atom_profile(f: Form) -> Profile:
    """What one comparison `f ? 0` contributes: a zone of d, a window of rows or columns, a period."""
    periodic = Profile(period=f.period) if f.d_only else Profile(mixed=f.period)
    if f.a == 0 and f.b == 0:
        return periodic
    if f.a + f.b == 0:           # a*d + p: the sign is fixed once |a*d| outruns p
        t1, t2 = -f.hi / f.a, -f.lo / f.a
        zone = (math.floor(min(t1, t2)) - 1, math.ceil(max(t1, t2)) + 1)
        return periodic.merge(Profile(zones=(zone,)))
    if f.a == 0 or f.b == 0:     # c*i + p (or c*j + p): fixed beyond a window of rows (columns)
        c = f.a or f.b
        last = math.ceil(max(-f.lo / c, -f.hi / c)) + 1
        window = ((0, last),) if last >= 0 else ()
        return periodic.merge(Profile(rows=window) if f.b == 0 else Profile(cols=window))
    raise Unsupported(f"`{f}` mixes i and j other than through i - j")


def where_profile(pred) -> Profile:
    """The profile of `where(pred)`, or a profile whose `reason` says why it is outside the fragment."""
    col = _Collector()
    try:
        col.condition(pred)
        prof = Profile()
        for f in col.atoms:
            prof = prof.merge(atom_profile(f))
    except Unsupported as e:
        return Profile(reason=f"where({pred}): {e}")
    return prof
