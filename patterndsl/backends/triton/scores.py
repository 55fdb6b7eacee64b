"""Triton source text for score terms: a stage's `Score.apply` (bias, soft cap) written by `TritonScoreOps` as
a `@triton.jit` function, the way `codegen.py` writes mask predicates, for kernels to take as a constexpr.

`score_tile(s, ia, j, h, T0, T1, W0, W1)`: `s` the scaled scores of a tile (float32), `ia` the absolute query
positions and `j` the keys (broadcasting int tensors), `h` the head index (int), `T0`, `T1` the bias tables'
pointers (row-major `[H, W0]`, `[H, W1]`; at most two tables per stage). Integer arithmetic runs in int64
(positions stay exact, as in the IR), floats in float32; `/` by zero gives 0; `tanh(x)` is `1 - 2 / (exp(2x)
+ 1)` (exact limits at both ends, no overflow); T5 buckets are sums of threshold comparisons; ALiBi slopes a
chain of `tl.where` over the heads. The generated statements hold only numbers and operators from the IR.

The scored kernels (`scored_kernels.py`) take it as a constexpr. For learned tables, `grad_source` writes
`table_grad_tile(ds, ia, j, h, T0, T1, W0, W1) -> (w0, b0, w1, b1)`: for each table read (a *site*, at most
two), the weight `ds * d bias / d table[h, b]` of every pair and its bucket `b`, by forward-mode derivatives
of the bias (`TritonGradOps`; the derivative of `abs`, `min`, `max` follows torch's: 0 at 0, split evenly at
ties). The backward sums the weights per bucket (`scored_kernels._bucket_sums`). `score_grid` evaluates the
score function on a tile (tests compare it with the torch evaluation of the same terms).

>>> from patterndsl.ir.scores import Score, Bin, Var, Const, Fn
>>> text = score_source(Score(Bin("*", Const(-0.5), Fn("abs", (Bin("-", Var("i"), Var("j")),)))), "_0")
>>> print(text.split("h64 = h.to(tl.int64)")[1].strip())
t0 = i64 - j64
    t1 = tl.abs(t0)
    t2 = -0.5 * t1.to(tl.float32)
    t3 = s + t2
    return t3
"""
from __future__ import annotations

import functools

from ...errors import PatternError

MAX_TABLES = 2
MAX_SITES = 2      # table reads (t5_bias terms) a bias may hold on Triton


class TritonScoreOps:
    """Score ops as text. A value is `(text, is_float, const)`: Python numbers fold into literals; every
    computed value is bound to a local (`t0 = ...`), so a shared subexpression is written once."""

    def __init__(self, tables: tuple[str, ...]):
        self.tables = tables
        self.lines: list[str] = []
        self.seen: dict[str, str] = {}      # right-hand side -> its local (the same text is computed once)

    def _tmp(self, text: str, is_float: bool):
        if text not in self.seen:
            self.seen[text] = f"t{len(self.lines)}"
            self.lines.append(f"{self.seen[text]} = {text}")
        return (self.seen[text], is_float, None)

    def var(self, name):
        return {"i": ("i64", False, None), "j": ("j64", False, None), "h": ("h64", False, None)}[name]

    def const(self, v):
        return self._lift(v)

    @staticmethod
    def _lift(x):
        if isinstance(x, tuple):
            return x
        return (repr(float(x)) if isinstance(x, float) else f"({x})", isinstance(x, float), x)

    @staticmethod
    def _f(x) -> str:
        text, is_float, const = x
        if const is not None:
            return repr(float(const))
        return text if is_float else f"{text}.to(tl.float32)"

    def bin(self, op, a, b):
        a, b = self._lift(a), self._lift(b)
        if op == "/":
            if b[2] is not None:
                return self._tmp(f"{self._f(a)} / {self._f(b)}", True) if b[2] != 0 else self._lift(0.0)
            den = self._f(b)
            return self._tmp(f"tl.where({den} == 0.0, 0.0, {self._f(a)} / tl.where({den} == 0.0, 1.0, {den}))",
                             True)
        if a[1] or b[1]:
            return self._tmp(f"{self._f(a)} {op} {self._f(b)}", True)
        return self._tmp(f"{a[0]} {op} {b[0]}", False)

    def call(self, func, args):
        args = [self._lift(a) for a in args]
        if func == "abs":
            return self._tmp(f"tl.abs({args[0][0]})", args[0][1])
        fn = "tl.minimum" if func == "min" else "tl.maximum"
        if args[0][1] or args[1][1]:
            return self._tmp(f"{fn}({self._f(args[0])}, {self._f(args[1])})", True)
        return self._tmp(f"{fn}({args[0][0]}, {args[1][0]})", False)

    def cmp(self, op, a, b):
        return (f"({self._lift(a)[0]} {op} {self._lift(b)[0]})", False, None)

    def scaled_flag(self, cond, k: int):
        return self._tmp(f"{cond[0]}.to(tl.int64) * {k}", False)

    def tanh(self, x):
        return self._tmp(f"1.0 - 2.0 / (tl.exp(2.0 * {self._f(x)}) + 1.0)", True)

    def per_head(self, values):
        out = "0.0"
        for k in reversed(range(len(values))):
            out = f"tl.where(h64 == {k}, {float(values[k])!r}, {out})"
        return self._tmp(out, True)

    def table(self, name, buckets, bucket):
        k = self.tables.index(name)
        return self._tmp(f"tl.load(T{k} + h64 * W{k} + {self._lift(bucket)[0]})", True)

    def add_bias(self, s, bias):
        return self._tmp(f"{self._f(s)} + {self._f(self._lift(bias))}", True)


def score_source(score, suffix: str = "") -> str:
    """The `score_tile{suffix}` function of a stage's pointwise terms."""
    if score.far is not None:
        raise PatternError("a far field has no pointwise score function", hint="it is a normaliser, not a term")
    tables = score.tables()
    if len(tables) > MAX_TABLES:
        raise PatternError(f"the Triton score function reads at most {MAX_TABLES} bias tables, got {len(tables)}")
    ops = TritonScoreOps(tables)
    text = score.apply(("s", True, None), ops)[0]
    head = ["i64 = ia.to(tl.int64)", "j64 = j.to(tl.int64)", "h64 = h.to(tl.int64)"]
    return "\n".join(["", "@triton.jit", f"def score_tile{suffix}(s, ia, j, h, T0, T1, W0, W1):",
                      *("    " + line for line in head + ops.lines), f"    return {text}"])


class _Dual:
    """A value of `TritonScoreOps` and its derivatives (also such values) per table site."""

    def __init__(self, p, d=None):
        self.p, self.d = p, d or {}


class TritonGradOps:
    """Forward-mode derivatives of a bias with respect to its table reads, as text. Every derivative is a float;
    integer values (positions, buckets) have none."""

    def __init__(self, tables: tuple[str, ...]):
        self.P = TritonScoreOps(tables)
        self.sites: list[tuple[str, tuple]] = []     # (table, bucket value) per read

    @staticmethod
    def _d(x) -> _Dual:
        return x if isinstance(x, _Dual) else _Dual(TritonScoreOps._lift(x))

    def var(self, name):
        return _Dual(self.P.var(name))

    def const(self, v):
        return _Dual(self.P.const(v))

    def _sum(self, terms):
        terms = [t for t in terms if t is not None]
        out = terms[0]
        for t in terms[1:]:
            out = self.P.bin("+", out, t)
        return out

    def bin(self, op, a, b):
        a, b = self._d(a), self._d(b)
        P, d = self.P, {}
        for s in sorted(a.d.keys() | b.d.keys()):
            da, db = a.d.get(s), b.d.get(s)
            if op in "+-":
                d[s] = self._sum([da, None if db is None else (db if op == "+" else P.bin("-", 0.0, db))])
            elif op == "*":
                d[s] = self._sum([None if da is None else P.bin("*", da, b.p),
                                  None if db is None else P.bin("*", a.p, db)])
            else:                     # (a / b)' = a' / b - a b' / b^2; 0 where b == 0, as a / b is
                d[s] = self._sum([None if da is None else P.bin("/", da, b.p),
                                  None if db is None else P.bin("-", 0.0, P.bin("/", P.bin("*", a.p, db),
                                                                                 P.bin("*", b.p, b.p)))])
        return _Dual(P.bin(op, a.p, b.p), d)

    def _where(self, cond: str, x, y):
        return self.P._tmp(f"tl.where({cond}, {self.P._f(x)}, {self.P._f(y)})", True)

    def call(self, func, args):
        args = [self._d(a) for a in args]
        P = self.P
        if func == "abs":
            x = args[0]
            if not x.d:
                return _Dual(P.call("abs", [x.p]))
            sign = P._tmp(f"tl.where({x.p[0]} > 0, 1.0, tl.where({x.p[0]} < 0, -1.0, 0.0))", True)
            return _Dual(P.call("abs", [x.p]), {s: P.bin("*", sign, dx) for s, dx in x.d.items()})
        a, b = args
        first, second = (">", "<") if func == "max" else ("<", ">")
        d = {}
        for s in sorted(a.d.keys() | b.d.keys()):
            da, db = a.d.get(s, P._lift(0.0)), b.d.get(s, P._lift(0.0))
            tie = P.bin("*", P.bin("+", da, db), 0.5)
            d[s] = self._where(f"{P._f(a.p)} {first} {P._f(b.p)}", da,
                               self._where(f"{P._f(a.p)} {second} {P._f(b.p)}", db, tie))
        return _Dual(P.call(func, [a.p, b.p]), d)

    def cmp(self, op, a, b):
        return _Dual(self.P.cmp(op, self._d(a).p, self._d(b).p))

    def scaled_flag(self, cond, k: int):
        return _Dual(self.P.scaled_flag(cond.p, k))

    def per_head(self, values):
        return _Dual(self.P.per_head(values))

    def table(self, name, buckets, bucket):
        bucket = self._d(bucket).p
        if (name, bucket) not in self.sites:            # a term written twice is one site (the same local)
            self.sites.append((name, bucket))
        return _Dual(self.P.table(name, buckets, bucket), {self.sites.index((name, bucket)): self.P._lift(1.0)})


def grad_source(score, suffix: str = "") -> str:
    """The `table_grad_tile{suffix}` function of a stage whose bias reads learned tables (see the module doc)."""
    ops = TritonGradOps(score.tables())
    bias = ops._d(score.bias.at(ops))
    if len(ops.sites) > MAX_SITES:
        raise PatternError(f"the Triton kernels read at most {MAX_SITES} table terms in a bias, got "
                           f"{len(ops.sites)}", hint="run this stage on the torch backend")
    P, outs = ops.P, []
    for k in range(MAX_SITES):
        if k < len(ops.sites) and k in bias.d:
            w = P._tmp(f"ds * {P._f(bias.d[k])}", True)[0]
            b = P._tmp(f"zero64 + {ops.sites[k][1][0]}", False)[0]
        else:
            w, b = "ds * 0.0", "zero64"
        outs += [w, b]
    head = ["i64 = ia.to(tl.int64)", "j64 = j.to(tl.int64)", "h64 = h.to(tl.int64)",
            "zero64 = (i64 - i64) + (j64 - j64)"]
    return "\n".join(["", "@triton.jit", f"def table_grad_tile{suffix}(ds, ia, j, h, T0, T1, W0, W1):",
                      *("    " + line for line in head + P.lines), f"    return {', '.join(outs)}"])


def table_sites(score) -> tuple[str, ...]:
    """The table each site of `grad_source` reads, in site order."""
    ops = TritonGradOps(score.tables())
    score.bias.at(ops)
    return tuple(name for name, _ in ops.sites)


@functools.lru_cache(maxsize=256)
def score_module(score):
    """The imported module holding `score_tile` for `score` (and `table_grad_tile` when it reads tables),
    generated once, cached on disk."""
    from .codegen import load_generated
    src = "import triton\nimport triton.language as tl\n" + score_source(score) + "\n"
    if score.tables():
        src += grad_source(score) + "\n"
    return load_generated("patterndsl_score", src)


def score_grid(score, s, q_offset: int, head: int, tables: dict):
    """`score_tile` on a whole (small) score matrix `s` `[n_q, n_k]` float32 of one head (for tests)."""
    import torch

    from .score_probe import score_probe_kernel
    n_q, n_k = s.shape
    names = score.tables()
    ts = [tables[n].float().contiguous() for n in names] + [s.new_zeros(1, 1)] * (MAX_TABLES - len(names))
    out = torch.empty_like(s)
    bm, bn = (max(16, 1 << (x - 1).bit_length()) for x in (n_q, n_k))
    score_probe_kernel[(1,)](s.contiguous(), out, n_q, n_k, q_offset, head, ts[0], ts[1], ts[0].shape[1],
                             ts[1].shape[1], score_tile=score_module(score).score_tile, BM=bm, BN=bn)
    return out
