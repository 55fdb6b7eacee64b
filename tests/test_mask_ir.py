"""The mask algebra: normal forms preserve meaning, and dense masks match docs/language.md §3's table pair by pair."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patterndsl.ir import mask as M
from patterndsl.ir import predicate as P
from patterndsl.ir.dense import dense_mask, dense_tile
from patterndsl.ir.verify import verify_mask

# ---- the table of docs/language.md §3, written pair by pair in plain Python (independent of ir/mask.py) ----------
PRIMS = {
    "sliding": lambda w, d: (M.sliding(w, d), lambda i, j: abs(i - j) <= w * d and (i - j) % d == 0),
    "window": lambda b, a, d: (M.window(b, a, d), lambda i, j: -a * d <= i - j <= b * d and (i - j) % d == 0),
    "global": lambda s: (M.global_(s), lambda i, j: i in s or j in s),
    "rows": lambda s: (M.rows(s), lambda i, j: i in s),
    "cols": lambda s: (M.cols(s), lambda i, j: j in s),
    "blocks": lambda b: (M.blocks(b), lambda i, j: i // b == j // b),
    "strided": lambda s: (M.strided(s), lambda i, j: (i - j) % s == 0),
}


def _leaf(draw):
    kind = draw(st.sampled_from(sorted(PRIMS) + ["full", "causal", "empty", "where"]))
    small, pos = st.integers(0, 5), st.integers(1, 4)
    idx = st.frozensets(st.integers(0, 12), max_size=3)
    if kind == "full":
        return M.FULL, lambda i, j: True
    if kind == "empty":
        return M.EMPTY, lambda i, j: False
    if kind == "causal":
        return M.CAUSAL, lambda i, j: j <= i
    if kind == "where":
        c = draw(st.integers(-3, 3))
        m = draw(st.integers(2, 4))
        pred = P.Cmp("==", P.Bin("%", P.Bin("+", P.I, P.Const(c)), P.Const(m)), P.Bin("%", P.J, P.Const(m)))
        return M.Where(pred), lambda i, j: (i + c) % m == j % m
    if kind == "sliding":
        return PRIMS[kind](draw(small), draw(pos))
    if kind == "window":
        return PRIMS[kind](draw(small), draw(small), draw(pos))
    if kind in ("global", "rows", "cols"):
        return PRIMS[kind](draw(idx))
    return PRIMS[kind](draw(pos))


@st.composite
def masks(draw, depth=3):
    if depth == 0 or draw(st.booleans()):
        return _leaf(draw)
    op = draw(st.sampled_from(["|", "&", "-", "~"]))
    a, fa = draw(masks(depth=depth - 1))
    if op == "~":
        return ~a, lambda i, j: not fa(i, j)
    b, fb = draw(masks(depth=depth - 1))
    if op == "|":
        return a | b, lambda i, j: fa(i, j) or fb(i, j)
    if op == "&":
        return a & b, lambda i, j: fa(i, j) and fb(i, j)
    return a - b, lambda i, j: fa(i, j) and not fb(i, j)


def _brute(fn, n_q, n_k):
    return torch.tensor([[bool(fn(i, j)) for j in range(n_k)] for i in range(n_q)], dtype=torch.bool)


@settings(max_examples=150, deadline=None)
@given(masks(), st.integers(1, 17), st.integers(1, 17))
def test_normal_form_keeps_meaning(mf, n_q, n_k):
    m, fn = mf
    verify_mask(m)
    assert torch.equal(dense_mask(m, n_q, n_k), _brute(fn, n_q, n_k))


@settings(max_examples=60, deadline=None)
@given(masks(), masks())
def test_union_and_intersection_commute(a, b):
    assert a[0] | b[0] == b[0] | a[0]
    assert a[0] & b[0] == b[0] & a[0]
    assert hash(a[0] | b[0]) == hash(b[0] | a[0])


def test_closed_form_simplifications():
    assert M.inter(M.CAUSAL, M.sliding(256)) == M.Band(0, 256, 1)
    assert M.inter(M.sliding(4, 2), M.strided(3)) == M.Band(-6, 6, 6)
    assert M.union(M.rows({1}), M.rows({2}), M.cols({3})) == M.Union((M.Cols(frozenset({3})),
                                                                      M.Rows(frozenset({1, 2}))))
    assert M.complement(M.complement(M.CAUSAL)) == M.CAUSAL
    assert M.sliding(3) | ~M.sliding(3) == M.FULL
    assert M.sliding(3) & ~M.sliding(3) == M.EMPTY
    assert M.blocks(1) == M.Band(0, 0, 1)
    assert M.strided(1) == M.FULL


def test_to_source_round_trips_through_dense():
    cases = [M.sliding(2, 2) | M.global_({0, 3}), M.CAUSAL & M.blocks(3), ~M.strided(2) - M.cols({1}),
             M.window(3, 0) | M.rows({5})]
    import patterndsl as pd
    for m in cases:
        again = pd.parse(f"pattern p() {{ attend softmax over {M.to_source(m)} }}").lower().stages[0].mask
        assert torch.equal(dense_mask(again, 13, 11), dense_mask(m, 13, 11)), M.to_source(m)
    assert M.to_source(M.CAUSAL) == "causal"
    assert M.to_source(M.sliding(2)) == "sliding(2)"
    assert M.to_source(M.window(3, 0, 2)) == "window(3, 0, 2)"
    assert M.to_source(M.cols(range(5))) == "cols(range(0, 5))"


@pytest.mark.parametrize("count,block,n", [(2, 4, 16), (3, 8, 70), (5, 4, 12), (0, 4, 8)])
def test_random_blocks_are_distinct_and_reproducible(count, block, n):
    a = M.random_blocks(count, block, 7, n, n)
    b = M.random_blocks(count, block, 7, n, n)
    assert torch.equal(a, b)
    n_kb = -(-n // block)
    assert a.shape == (-(-n // block), min(count, n_kb))
    for row in a.tolist():
        assert len(set(row)) == len(row) and all(0 <= x < n_kb for x in row)
    if count:
        dense = dense_mask(M.Random(count, block, 7), n, n)
        for qb, row in enumerate(a.tolist()):
            for i in range(qb * block, min(n, (qb + 1) * block)):
                keys = {j // block for j in range(n) if dense[i, j]}
                assert keys == set(row)


def test_random_draw_depends_on_seed():
    assert not torch.equal(M.random_blocks(3, 4, 0, 64, 64), M.random_blocks(3, 4, 1, 64, 64))


def test_dense_tile_matches_dense_mask():
    m = M.sliding(3, 2) | M.global_({5}) | M.Random(2, 4, 1)
    full = dense_mask(m, 37, 29)
    rows, cols = torch.arange(8, 20), torch.arange(3, 29)
    assert torch.equal(dense_tile(m, rows, cols, (37, 29)), full[8:20, 3:29])


def test_same_reads_runtime_ids():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    got = dense_mask(M.Same("seg") & M.CAUSAL, 5, runtime={"seg": ids})
    assert got.shape == (2, 5, 5)
    for b in range(2):
        for i, j in itertools.product(range(5), range(5)):
            assert bool(got[b, i, j]) == (ids[b, i] == ids[b, j] and j <= i)


def test_same_without_ids_is_a_pattern_error():
    from patterndsl.errors import PatternError
    with pytest.raises(PatternError, match="runtime ids 'seg'.*none were given"):
        dense_mask(M.Same("seg"), 4)


@pytest.mark.parametrize("a,b,want", [
    (M.sliding(1), M.sliding(2), M.sliding(2)),                       # nested
    (M.window(3, 0), M.window(0, 3), M.sliding(3)),                  # overlapping halves
    (M.window(3, 0), M.band(-5, -1), M.window(3, 5)),                # touching on the lattice
    (M.sliding(2, 2), M.sliding(4), M.sliding(4)),                   # a dilated band inside a dense one
    (M.CAUSAL, M.band(None, -1), M.FULL),                            # the two halves of the plane
    (M.sliding(1, 2), M.band(3, 5, 2), M.band(-2, 4, 2)),            # same step, adjacent
], ids=["nested", "halves", "touching", "dilated-inside", "plane", "dilated-adjacent"])
def test_band_unions_merge_to_one_band(a, b, want):
    got = a | b
    assert got == want and (b | a) == want
    assert torch.equal(dense_mask(got, 19, 23), dense_mask(a, 19, 23) | dense_mask(b, 19, 23))


def test_band_unions_that_are_not_one_band_stay_apart():
    m = M.sliding(1) | M.band(5, 6)                                  # a gap at offsets 2..4
    assert isinstance(m, M.Union) and len(m.parts) == 2
    assert isinstance(M.sliding(2, 2) | M.sliding(1, 3), M.Union)    # different steps, neither covers
