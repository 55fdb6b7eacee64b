"""Block layouts: the closed form never calls a tile full or empty when it is not (property test vs dense)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.ir.dense import dense_mask
from patterndsl.plan.layout import EMPTY, FULL, PARTIAL, block_layout, tile_lists

from test_mask_ir import masks


def _truth(dense, bm, bn):
    n_q, n_k = dense.shape
    out = []
    for a in range(0, n_q, bm):
        row = []
        for b in range(0, n_k, bn):
            tile = dense[a:a + bm, b:b + bn]
            row.append(FULL if tile.all() else EMPTY if not tile.any() else PARTIAL)
        out.append(row)
    return torch.tensor(out, dtype=torch.int8)


def _check(layout, truth):
    assert layout.shape == truth.shape
    said_full, said_empty = layout == FULL, layout == EMPTY
    assert torch.equal(truth[said_full], torch.full_like(truth[said_full], FULL)), "a tile called full is not"
    assert torch.equal(truth[said_empty], torch.full_like(truth[said_empty], EMPTY)), "a tile called empty is not"


@settings(max_examples=150, deadline=None)
@given(masks(), st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([1, 2, 5, 8]))
def test_layout_is_exact_where_it_says_full_or_empty(mf, n_q, n_k, bm, bn):
    m, _ = mf
    _check(block_layout(m, n_q, n_k, bm, bn), _truth(dense_mask(m, n_q, n_k), bm, bn))


@pytest.mark.parametrize("name", pd.builtins())
@pytest.mark.parametrize("n,block", [(1000, (64, 64)), (4096, (128, 64))])
def test_builtin_layouts_at_larger_sizes(name, n, block):
    params = {"window": 64} if name in ("longformer", "dilated_window") else {}
    params.update({"window": 100} if name == "sliding_window" else {})
    params.update({"stride": 32} if name == "sparse_transformer" else {})
    params.update({"block": 16} if name == "bigbird" else {})
    params.update({"local_heads": 4} if name == "longformer_performer" else {})
    op = pd.compile(name, backend="reference", **params)
    n_k = 16 if name == "luna" else n  # luna's output stage reads the 16 packed rows
    _check(op.block_layout(n, n_k, block), _truth(op.mask(n, n_k) if op.mask(n, n_k).dim() == 2
                                                  else op.mask(n, n_k)[0], *block))


def test_bands_are_exactly_classified():
    op = pd.compile("longformer", window=256, globals=set())
    layout = op.block_layout(1024, 1024, (64, 64))
    truth = _truth(op.mask(1024), 64, 64)
    assert torch.equal(layout, truth)  # for step-1 bands the closed form is exact


def test_tile_lists_are_the_nonempty_tiles():
    layout = block_layout(pd.builtin("longformer").lower(window=8).stages[0].mask, 20, 20, 4, 4)
    row_ptr, col_idx, is_full = tile_lists(layout)
    for a in range(layout.shape[0]):
        cols = col_idx[row_ptr[a]:row_ptr[a + 1]].tolist()
        assert cols == (layout[a] != EMPTY).nonzero().flatten().tolist()
        assert is_full[row_ptr[a]:row_ptr[a + 1]].tolist() == [layout[a, c] == FULL for c in cols]


def test_same_without_ids_is_partial_everywhere():
    from patterndsl.ir.mask import Same
    assert (block_layout(Same("s"), 10, 10, 4, 4) == PARTIAL).all()
    ids = torch.tensor([[0] * 4 + [1] * 6])
    layout = block_layout(Same("s"), 10, 10, 4, 4, runtime={"s": ids})
    _check(layout, _truth(dense_mask(Same("s"), 10, 10, {"s": ids})[0], 4, 4))
