"""Block layouts: the closed form never calls a tile full or empty when it is not (property tests vs dense),
is exact when its uncertain tiles are settled, and its sparse form lists exactly the nonempty tiles."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.ir import mask as M
from patterndsl.ir import predicate as P
from patterndsl.ir.dense import dense_mask
from patterndsl.plan import layout as L
from patterndsl.plan.layout import EMPTY, FULL, PARTIAL, band_bounds, block_layout, tile_layout, tile_lists
from patterndsl.ir.masks import Tiles
from patterndsl.plan.points import mask_at
from patterndsl.plan.tiles import Grid

from test_mask_ir import masks


def _truth(dense, bm, bn):
    """Exact classes by reshaping the dense mask (padding counts as allowed for 'all', not for 'any')."""
    n_q, n_k = dense.shape[-2:]
    nqb, nkb = -(-n_q // bm), -(-n_k // bn)
    some = torch.zeros(nqb * bm, nkb * bn, dtype=torch.bool)
    every = torch.ones(nqb * bm, nkb * bn, dtype=torch.bool)
    some[:n_q, :n_k] = dense.any(0) if dense.dim() == 3 else dense
    every[:n_q, :n_k] = dense.all(0) if dense.dim() == 3 else dense
    any_ = some.view(nqb, bm, nkb, bn).any(3).any(1)
    all_ = every.view(nqb, bm, nkb, bn).all(3).all(1)
    return torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)


def _sound(layout, truth):
    assert layout.shape == truth.shape
    said_full, said_empty = layout == FULL, layout == EMPTY
    assert (truth[said_full] == FULL).all(), "a tile called full is not"
    assert (truth[said_empty] == EMPTY).all(), "a tile called empty is not"


def _where_leaf(draw):
    c = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["near", "blockdiag", "minmax", "mod"]))
    if kind == "near":       # abs(i - j) <= c
        return M.Where(P.Cmp("<=", P.Call("abs", (P.Bin("-", P.I, P.J),)), P.Const(c)))
    if kind == "blockdiag":  # abs(i // c - j // c) <= 1
        diff = P.Bin("-", P.Bin("//", P.I, P.Const(c)), P.Bin("//", P.J, P.Const(c)))
        return M.Where(P.Cmp("<=", P.Call("abs", (diff,)), P.Const(1)))
    if kind == "minmax":     # min(i, j) * 2 >= max(i, j) - c
        return M.Where(P.Cmp(">=", P.Bin("*", P.Call("min", (P.I, P.J)), P.Const(2)),
                             P.Bin("-", P.Call("max", (P.I, P.J)), P.Const(c))))
    return M.Where(P.Logic("not", P.Cmp("==", P.Bin("%", P.Bin("-", P.I, P.J), P.Const(c + 1)), P.Const(0))))


@st.composite
def rich_masks(draw, depth=2):
    """The algebra's masks plus `random` and a few `where` shapes that interval arithmetic must bound."""
    pick = draw(st.integers(0, 3))
    if depth and pick == 0:
        a, b = draw(rich_masks(depth=depth - 1)), draw(rich_masks(depth=depth - 1))
        return draw(st.sampled_from([a | b, a & b, a - b, ~a]))
    if pick == 1:
        return _where_leaf(draw)
    if pick == 2:
        return M.Random(draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(0, 3)))
    return draw(masks(depth=1))[0]


@settings(max_examples=150, deadline=None)
@given(masks(), st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([1, 2, 5, 8]))
def test_layout_is_exact_on_the_algebra(mf, n_q, n_k, bm, bn):
    m, _ = mf
    truth = _truth(dense_mask(m, n_q, n_k), bm, bn)
    assert torch.equal(block_layout(m, n_q, n_k, bm, bn), truth)   # small: uncertain tiles are settled
    assert torch.equal(tile_layout(m, n_q, n_k, bm, bn).dense(), truth)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rich_masks(), st.integers(1, 70), st.integers(1, 70), st.sampled_from([1, 3, 4, 16]), st.sampled_from([2, 5, 8]))
def test_layout_is_sound_without_settling(monkeypatch_budget, m, n_q, n_k, bm, bn):
    truth = _truth(dense_mask(m, n_q, n_k), bm, bn)
    _sound(block_layout(m, n_q, n_k, bm, bn), truth)
    _sound(tile_layout(m, n_q, n_k, bm, bn).dense(), truth)


@pytest.fixture
def monkeypatch_budget(monkeypatch):
    monkeypatch.setattr(L, "REFINE_BUDGET", 0)   # no pair evaluation: the closed forms alone


@settings(max_examples=60, deadline=None)
@given(rich_masks(), st.integers(1, 70), st.integers(1, 70), st.sampled_from([4, 16]), st.sampled_from([2, 8]))
def test_layout_with_settling_is_exact(m, n_q, n_k, bm, bn):
    truth = _truth(dense_mask(m, n_q, n_k), bm, bn)
    assert torch.equal(block_layout(m, n_q, n_k, bm, bn), truth)


@settings(max_examples=40, deadline=None)
@given(rich_masks(), st.integers(1, 30), st.integers(1, 30))
def test_pointwise_evaluation_matches_dense(m, n_q, n_k):
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    assert torch.equal(mask_at(m, i, j, (n_q, n_k)), dense_mask(m, n_q, n_k))


BUILTIN_PARAMS = {"longformer": {"window": 64}, "dilated_window": {"window": 64}, "sliding_window": {"window": 100},
                  "sparse_transformer": {"stride": 32}, "bigbird": {"block": 16},
                  "longformer_performer": {"local_heads": 4}}


def _closed_form(mask, n_q, n_k, block):
    """(classes, unsure) of every tile from the masks' closed forms alone (no settling)."""
    g = Grid(n_q, n_k, *block)
    a, b = torch.arange(g.nqb)[:, None], torch.arange(g.nkb)[None, :]
    cls, unsure = mask.classify(Tiles(g), a, b)
    return torch.broadcast_tensors(cls, unsure, a + b)[:2]


@pytest.mark.parametrize("name", pd.builtins())
@pytest.mark.parametrize("n,block", [(1000, (64, 64)), (4096, (128, 64)), (4001, (96, 40))],
                         ids=["N1000-64x64", "N4096-128x64", "N4001-96x40"])
def test_builtin_layouts_at_larger_sizes(name, n, block):
    op = pd.compile(name, backend="reference", **BUILTIN_PARAMS.get(name, {}))
    n_k = 16 if name == "luna" else n  # luna's output stage reads the 16 packed rows
    dense = op.mask(n, n_k)
    truth = _truth(dense if dense.dim() == 2 else dense[0], *block)
    mask = op._mask_stage(None).mask
    cls, unsure = _closed_form(mask, n, n_k, block)
    assert torch.equal(cls[~unsure], truth[~unsure]), "the closed form is wrong where it claims to be exact"
    _sound(cls, truth)
    assert torch.equal(op.block_layout(n, n_k, block), truth)          # uncertain tiles settled: exact
    assert torch.equal(tile_layout(mask, n, n_k, *block).dense(), truth)


@pytest.mark.parametrize("window,dilation", [(256, 1), (64, 3), (100, 1)])
def test_bands_are_exactly_classified_at_N2048(window, dilation):
    op = pd.compile("longformer", window=window, dilation=dilation, globals={0, 700})
    assert torch.equal(op.block_layout(2048, 2048, (64, 64)), _truth(op.mask(2048), 64, 64))


@pytest.mark.parametrize("band", [M.sliding(5), M.CAUSAL, M.window(0, 9, 2), M.Band(3, 40, 1), M.strided(7)],
                         ids=str)
@pytest.mark.parametrize("by", ["rows", "cols"])
def test_band_bounds_cover_exactly_the_nonempty_tiles(band, by):
    layout = block_layout(band, 100, 90, 8, 16)
    layout = layout if by == "rows" else layout.t()
    first, last = band_bounds(band, 100, 90, 8, 16, by=by)
    for a in range(layout.shape[0]):
        nz = (layout[a] != EMPTY).nonzero().flatten().tolist()
        if band.step == 1:
            assert nz == list(range(int(first[a]), int(last[a]) + 1))
        else:
            assert set(nz) <= set(range(int(first[a]), int(last[a]) + 1))


def test_band_bounds_reject_other_masks():
    with pytest.raises(TypeError, match="band_bounds takes a Band, got Union"):
        band_bounds(M.sliding(2) | M.cols({0}), 8, 8, 4, 4)


def test_tile_lists_are_the_nonempty_tiles():
    m = pd.builtin("longformer").lower(window=8).stages[0].mask
    layout = block_layout(m, 20, 20, 4, 4)
    for form in (layout, tile_layout(m, 20, 20, 4, 4)):
        row_ptr, col_idx, is_full = tile_lists(form)
        for a in range(layout.shape[0]):
            cols = col_idx[row_ptr[a]:row_ptr[a + 1]].tolist()
            assert cols == (layout[a] != EMPTY).nonzero().flatten().tolist()
            assert is_full[row_ptr[a]:row_ptr[a + 1]].tolist() == [layout[a, c] == FULL for c in cols]


def test_transpose_lists_query_tiles_per_key_tile():
    m = M.sliding(3) | M.rows({17}) | M.Random(1, 5, 2)
    sparse = tile_layout(m, 37, 23, 4, 8)
    assert torch.equal(sparse.transpose().dense(), sparse.dense().t())
    assert sparse.transpose().transpose().dense().equal(sparse.dense())


def test_layout_prints_a_picture():
    text = str(tile_layout(M.sliding(4) | M.cols({0}), 16, 16, 4, 4))
    assert text.splitlines() == ["TileLayout 16x16 in 4x4 tiles: 12 of 16 nonempty (75.0%), 8 partial",
                                 "  #+..", "  +#+.", "  ++#+", "  +.+#"]


def test_global_rows_and_columns_are_sparse_at_a_million_tokens():
    m = pd.compile("longformer", window=512).ir.stages[0].mask
    n = 1 << 20
    sparse = tile_layout(m, n, n, 64, 64)
    nqb = n // 64
    per_row = sparse.row_ptr.diff()
    assert int(per_row[0]) == nqb                      # the global row: every key tile
    assert int(per_row[1:].max()) <= 11                # the band's tiles plus the global column
    assert (sparse.col_idx == 0).sum() == nqb          # the global column: every query tile


def test_same_without_ids_is_partial_everywhere():
    assert (block_layout(M.Same("s"), 10, 10, 4, 4) == PARTIAL).all()


@pytest.mark.parametrize("ids", [[[0] * 4 + [1] * 6], [[0] * 4 + [1] * 6, [0] * 8 + [2] * 2], [[3, 1, 3, 1, 1, 2, 2, 2, 2, 0]]])
def test_same_with_ids_is_sound_in_every_batch_row(ids, monkeypatch):
    ids = torch.tensor(ids)
    for budget in (0, 1 << 20):
        monkeypatch.setattr(L, "REFINE_BUDGET", budget)
        for m in (M.Same("s"), M.Same("s") & M.CAUSAL, M.Same("s") | M.sliding(1)):
            layout = block_layout(m, 10, 10, 4, 3, runtime={"s": ids})
            truth = _truth(dense_mask(m, 10, 10, {"s": ids}), 4, 3)
            _sound(layout, truth)
            if budget:
                assert torch.equal(layout, truth)


def test_empty_shapes():
    assert block_layout(M.sliding(2), 0, 5, 4, 4).shape == (0, 2)
    assert tile_layout(M.sliding(2), 0, 5, 4, 4).nnz == 0


def test_intersection_enumerates_only_its_sparsest_part():
    """`causal & random(...)` lists the random part's tiles, never the causal half (N^2 / 2 tiles at 1M)."""
    g = Grid(1 << 14, 1 << 14, 64, 64)
    sparse = M.Random(3, 64, 0)
    a, b = M.inter(M.CAUSAL, sparse).candidates(Tiles(g))
    ra, rb = sparse.candidates(Tiles(g))
    assert torch.equal(a, ra) and torch.equal(b, rb)
    assert a.numel() < 8 * (g.nqb * 3)          # about count tiles per row, not nqb * nkb / 2
