"""Predicates of `where(...)`: Python integer semantics on every target, division by zero gives 0."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patterndsl.ir import predicate as P

_ops = st.sampled_from(["+", "-", "*", "//", "%"])


@st.composite
def terms(draw, depth=3):
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from([P.I, P.J, P.Const(draw(st.integers(-5, 5)))]))
    kind = draw(st.sampled_from(["bin", "abs", "min", "max"]))
    if kind == "bin":
        return P.Bin(draw(_ops), draw(terms(depth=depth - 1)), draw(terms(depth=depth - 1)))
    if kind == "abs":
        return P.Call("abs", (draw(terms(depth=depth - 1)),))
    return P.Call(kind, (draw(terms(depth=depth - 1)), draw(terms(depth=depth - 1))))


@st.composite
def preds(draw):
    c = P.Cmp(draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="])), draw(terms()), draw(terms()))
    if draw(st.booleans()):
        return c
    other = P.Cmp("<=", draw(terms()), draw(terms()))
    op = draw(st.sampled_from(["and", "or", "not"]))
    return P.Logic("not", c) if op == "not" else P.Logic(op, c, other)


@settings(max_examples=200, deadline=None)
@given(preds())
def test_torch_matches_python_semantics(p):
    n = 9
    i = torch.arange(-4, n)[:, None]
    j = torch.arange(-4, n)[None, :]
    got = P.evaluate(p, i, j, P.TORCH_OPS)
    got = torch.as_tensor(got).expand(i.shape[0], j.shape[1])
    want = [[bool(P.evaluate(p, a, b, P.PYTHON_OPS)) for b in range(-4, n)] for a in range(-4, n)]
    assert got.tolist() == want


def test_floor_semantics_and_zero_division():
    assert P.evaluate(P.Bin("//", P.Const(-7), P.Const(2)), 0, 0, P.PYTHON_OPS) == -4
    assert P.evaluate(P.Bin("%", P.Const(-7), P.Const(2)), 0, 0, P.PYTHON_OPS) == 1
    t = P.evaluate(P.Bin("//", P.I, P.J), torch.tensor([-7, 3]), torch.tensor([2, 0]))
    assert t.tolist() == [-4, 0]
    t = P.evaluate(P.Bin("%", P.I, P.J), torch.tensor([-7, 3]), torch.tensor([2, 0]))
    assert t.tolist() == [1, 0]


def test_printing_parenthesises_by_precedence():
    p = P.Cmp("==", P.Bin("%", P.Bin("-", P.I, P.J), P.Const(3)), P.Const(0))
    assert str(p) == "(i - j) % 3 == 0"
    q = P.Logic("and", P.Logic("or", p, p), P.Logic("not", p))
    assert str(q) == "((i - j) % 3 == 0 or (i - j) % 3 == 0) and not (i - j) % 3 == 0"
    assert P.uses(p) == {"i", "j"}
