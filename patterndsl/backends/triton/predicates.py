"""Triton source text for masks: the mask ops (`ir/masks/base.py`) as text, and the data leaves they read from AUX.

`TritonOps` turns a mask's pointwise definition (`Mask.at`) into Triton text with Python integer semantics:
Triton's `//` and `%` truncate toward zero, the IR's floor (and divide-by-zero gives 0), so constant divisors
fold into `((x % d) + d) % d` forms (plain `//` `%` where the dividend is known >= 0) and other divisors call
the `_floordiv` / `_floormod` helpers emitted beside every mask. Every integer fragment carries bounds
(positions are in [0, 2^31)): arithmetic stays int32 where the bounds prove it cannot overflow and is int64
otherwise, and comparisons the bounds decide fold to constants. Data a mask reads (index sets, random
blocks, runtime ids) becomes a `Leaf`: a load from the int32 buffer `AUX`, whose header holds the call's
query offset (entry 0) and the offset of each leaf's data (`build_aux` in tiles.py).

>>> from patterndsl.ir import predicate as P
>>> ops = TritonOps()
>>> P.evaluate(P.Bin("%", P.Bin("-", P.I, P.J), P.Const(3)), I, J, ops).text
'((((ia - j) % 3) + 3) % 3)'
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...ir.predicate import PYTHON_OPS

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True)
class Code:
    """A fragment of Triton text: its value if it is a compile-time constant, bounds of its value (None:
    unknown), whether the text is int64, for `x % d` a truncated remainder with the same zero test, and
    whether it is a condition (int1) rather than a number."""
    text: str
    const: int | bool | None = None
    lo: int | None = None
    hi: int | None = None
    wide: bool = False
    zero: str | None = None
    boolean: bool = False

    @property
    def nonneg(self) -> bool:
        return self.lo is not None and self.lo >= 0


I = Code("ia", lo=0, hi=I32_MAX)    # the absolute query position (row i of the call + the query offset)
J = Code("j", lo=0, hi=I32_MAX)
_BOOL = dict(lo=0, hi=1, boolean=True)
_NAMES64 = {"ia": "i64", "j": "j64"}


def _c(v) -> Code:
    if isinstance(v, bool):
        return Code(str(v), v, int(v), int(v))
    return Code(str(v) if v >= 0 else f"({v})", v, v, v, wide=not I32_MIN <= v <= I32_MAX)


def _fits(lo, hi) -> bool:
    return lo is not None and hi is not None and I32_MIN <= lo and hi <= I32_MAX


def _text(x: Code, wide: bool) -> str:
    """x's text, as int64 when `wide` (constants stay literals)."""
    if not wide or x.wide or x.const is not None:
        return x.text
    return _NAMES64.get(x.text, f"{x.text}.to(tl.int64)")


def _cond(x: Code) -> str:
    """x as a condition: a number is true where it is not 0 (as in Python)."""
    return x.text if x.boolean else f"({x.text} != 0)"


def _arith_bounds(op, a: Code, b: Code):
    if None in (a.lo, a.hi, b.lo, b.hi):
        return None, None
    if op == "+":
        return a.lo + b.lo, a.hi + b.hi
    if op == "-":
        return a.lo - b.hi, a.hi - b.lo
    corners = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return min(corners), max(corners)


def _cmp_decided(op, a: Code, b: Code):
    """True or False when the bounds decide the comparison, else None."""
    if None in (a.lo, a.hi, b.lo, b.hi):
        return None
    if op in (">", ">="):
        a, b, op = b, a, "<" if op == ">" else "<="
    if op == "<":
        return True if a.hi < b.lo else False if a.lo >= b.hi else None
    if op == "<=":
        return True if a.hi <= b.lo else False if a.lo > b.hi else None
    same = a.lo == a.hi == b.lo == b.hi
    apart = a.hi < b.lo or b.hi < a.lo
    eq = True if same else False if apart else None
    return eq if op == "==" or eq is None else not eq


class TritonOps:
    """Ops building the text of one `mask_tile`: statements go to `lines`, data leaves to `leaves`."""

    def __init__(self):
        self.lines: list[str] = []
        self.leaves: list = []
        self._done: dict = {}
        self._n = 0

    def _fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def _bind(self, x: Code) -> Code:
        """x as a name (a statement of its own), so that it can appear twice in an expression."""
        if re.fullmatch(r"[A-Za-z_]\w*", x.text) or x.const is not None:
            return x
        name = self._fresh("t")
        self.lines.append(f"{name} = {x.text}")
        return Code(name, x.const, x.lo, x.hi, x.wide)

    def _slot(self, leaf) -> int:
        """The AUX header entry of `leaf` (entry 0 is the query offset)."""
        if leaf not in self.leaves:
            self.leaves.append(leaf)
        return 1 + sum(x.parts for x in self.leaves[:self.leaves.index(leaf)])

    # ------------------------------------------------------------------------------------ arithmetic
    def const(self, v):
        return _c(v)

    def bin(self, op, a: Code, b: Code) -> Code:
        if a.const is not None and b.const is not None:
            return _c(PYTHON_OPS.bin(op, int(a.const), int(b.const)))
        if op in "+-*":
            lo, hi = _arith_bounds(op, a, b)
            wide = a.wide or b.wide or not _fits(lo, hi)
            return Code(f"({_text(a, wide)} {op} {_text(b, wide)})", lo=lo, hi=hi, wide=wide)
        if b.const == 0:
            return _c(0)
        if b.const is not None:
            return self._by_const(op, a, int(b.const))
        fn = "_floordiv" if op == "//" else "_floormod"
        zero = "zero64" if a.const is not None else None
        x = f"({zero} + {a.text})" if zero else _text(a, True)
        return Code(f"{fn}({x}, {_text(b, True)})", wide=True)

    def _by_const(self, op, a: Code, d: int) -> Code:
        """`a // d` or `a % d` for a constant d != 0, floor-correct."""
        if a.lo is not None and a.hi is not None:
            q_lo, q_hi = sorted((a.lo // d, a.hi // d))
            if op == "//" and q_lo == q_hi:
                return _c(q_lo)
            if op == "%" and a.lo // d == a.hi // d:
                r_lo, r_hi = a.lo - d * (a.lo // d), a.hi - d * (a.lo // d)
                return a if (r_lo, r_hi) == (a.lo, a.hi) else self.bin("-", a, _c(d * (a.lo // d)))
        m, wide = abs(d), a.wide or 2 * abs(d) > I32_MAX or not _fits(a.lo, a.hi) or a.lo == I32_MIN
        bounds = (q_lo, q_hi) if op == "//" and a.lo is not None else (None, None)
        if a.nonneg and d > 0:
            rb = bounds if op == "//" else (0, min(d - 1, a.hi))
            return Code(f"({_text(a, wide)} {op} {m})", lo=rb[0], hi=rb[1], wide=wide,
                        zero=f"({_text(a, wide)} % {m})" if op == "%" else None)
        a = self._bind(a) if op == "//" else a       # `//` below reads x twice
        x = _text(a, wide) if d > 0 else f"(-{_text(a, wide)})"
        mod = f"((({x} % {m}) + {m}) % {m})"
        if op == "%":
            lo, hi = (0, d - 1) if d > 0 else (d + 1, 0)
            return Code(mod if d > 0 else f"(-{mod})", lo=lo, hi=hi, wide=wide, zero=f"({x} % {m})")
        return Code(f"(({x} - {mod}) // {m})", lo=bounds[0], hi=bounds[1], wide=wide)

    def call(self, func, args):
        if all(a.const is not None for a in args):
            return _c(PYTHON_OPS.call(func, [int(a.const) for a in args]))
        if func == "abs":
            a = args[0]
            wide = a.wide or not _fits(a.lo, a.hi) or a.lo == I32_MIN
            hi = None if a.lo is None else max(abs(a.lo), abs(a.hi))
            lo = None if a.lo is None else (a.lo if a.lo >= 0 else (-a.hi if a.hi <= 0 else 0))
            return Code(f"tl.abs({_text(a, wide)})", lo=lo, hi=hi, wide=wide)
        a, b = args
        if a.const is not None:
            a, b = b, a
        wide = a.wide or b.wide
        pick = min if func == "min" else max
        lo = None if None in (a.lo, b.lo) else pick(a.lo, b.lo)
        hi = None if None in (a.hi, b.hi) else pick(a.hi, b.hi)
        other = f"({'zero64' if wide else 'zero32'} + {b.text})" if b.const is not None else _text(b, wide)
        return Code(f"tl.{'minimum' if func == 'min' else 'maximum'}({_text(a, wide)}, {other})",
                    lo=lo, hi=hi, wide=wide)

    def cmp(self, op, a: Code, b: Code) -> Code:
        if a.const is not None and b.const is not None:
            return _c(PYTHON_OPS.cmp(op, a.const, b.const))
        decided = _cmp_decided(op, a, b)
        if decided is not None:
            return _c(decided)
        if op in ("==", "!=") and b.const == 0 and a.zero:
            return Code(f"({a.zero} {op} 0)", **_BOOL)
        wide = a.wide or b.wide
        return Code(f"({_text(a, wide)} {op} {_text(b, wide)})", **_BOOL)

    def logic(self, op, a: Code, b: Code | None = None) -> Code:
        if op == "not":
            return _c(not a.const) if a.const is not None else Code(f"(~{_cond(a)})", **_BOOL)
        for x, y in ((a, b), (b, a)):
            if x.const is not None:
                if bool(x.const) == (op == "and"):
                    return y if y.boolean or y.const is not None else Code(_cond(y), **_BOOL)  # true and y
                return _c(op == "or")  # false and y, true or y
        return Code(f"({_cond(a)} {'&' if op == 'and' else '|'} {_cond(b)})", **_BOOL)

    # ------------------------------------------------------------------------------------------ data
    def member(self, x: Code, idx: frozenset, side: str) -> Code:
        k = self._slot(Member(idx, side))
        key = ("member", k, x.text)
        if key not in self._done:
            name = self._fresh("f")
            if side == "q":
                r, bound = ("i", "i < N_Q") if x.text == "ia" else (f"({x.text} - qo)", f"({x.text} >= qo) & "
                                                                                       f"({x.text} < qo + N_Q)")
            else:
                r, bound = x.text, f"{x.text} < N_K" if x.nonneg else f"({x.text} >= 0) & ({x.text} < N_K)"
            self.lines.append(f"{name} = tl.load(AUX + tl.load(AUX + {k}) + {r}, mask={bound}, other=0) != 0")
            self._done[key] = Code(name, **_BOOL)
        return self._done[key]

    def lookup(self, node, row: Code, value: Code) -> Code:
        """value (>= 0) is in row `row` of `node.table`: AUX holds the table's row count, then its rows."""
        k = self._slot(Lookup(node))
        row, value = self._bind(row), self._bind(value)
        o, n, hit, w = self._fresh("o"), self._fresh("n"), self._fresh("h"), node.width
        pick = (f"tl.load(AUX + {o} + 1 + {row.text} * {w} + c, mask=({row.text} >= 0) & ({row.text} < {n}), "
                f"other=-1) == {value.text}")
        self.lines += [f"{o} = tl.load(AUX + {k})", f"{n} = tl.load(AUX + {o})",
                       f"{hit} = {pick.replace(' + c,', ',')}"]
        if w > 1:
            self.lines += [f"for c in tl.static_range(1, {w}):", f"    {hit} = {hit} | ({pick})"]
        return Code(hit, **_BOOL)

    def ids(self, name: str, side: str, x: Code) -> Code:
        k = self._slot(Ids(name))
        var = self._fresh("qid" if side == "q" else "kid")
        if side == "q":
            r = "i" if x.text == "ia" else f"({x.text} - qo)"
            self.lines.append(f"{var} = tl.load(AUX + tl.load(AUX + {k}) + b * N_Q + {r}, mask=({r} >= 0) & "
                              f"({r} < N_Q), other=-1)")
        else:
            self.lines.append(f"{var} = tl.load(AUX + tl.load(AUX + {k + 1}) + b * N_K + {x.text}, mask="
                              f"({x.text} >= 0) & ({x.text} < N_K), other=-2)")
        return Code(var, lo=-2, hi=I32_MAX)


# ------------------------------------------------------------------------------------------------ leaves
@dataclass(frozen=True)
class Member:
    """A 0/1 int32 flag per query row of the call (side "q": position q_offset + row) or per key."""
    idx: frozenset
    side: str
    parts = 1

    def data(self, n_q, n_k, q_offset, batch, runtime):
        pos = torch.arange(n_q) + q_offset if self.side == "q" else torch.arange(n_k)
        return [torch.isin(pos, torch.tensor(sorted(self.idx), dtype=torch.long)).to(torch.int32)]


@dataclass(frozen=True)
class Lookup:
    """The row count of `node.table`, then the table (int32, -1 pads)."""
    node: object
    parts = 1

    def data(self, n_q, n_k, q_offset, batch, runtime):
        table = self.node.table(q_offset + n_q, n_k)
        return [torch.cat([torch.tensor([table.shape[0]]), table.flatten()]).to(torch.int32)]


@dataclass(frozen=True)
class Ids:
    """Runtime ids of `same(name)`: query ids `[B, N_Q]`, then key ids `[B, N_K]`, renumbered densely."""
    name: str
    parts = 2

    def data(self, n_q, n_k, q_offset, batch, runtime):
        from ..custom import runtime_ids
        q_ids, k_ids = runtime_ids(self.name, runtime, batch, n_q, n_k)
        both = torch.cat([q_ids.reshape(-1), k_ids.reshape(-1)])
        dense = torch.unique(both, return_inverse=True)[1].to(torch.int32)
        return [dense[:q_ids.numel()].cpu(), dense[q_ids.numel():].cpu()]
