"""Layouts are exact where the closed form claims to be: a single band, `full`, index sets and blocks settle
no tile (the closed form alone gives the dense truth at large sizes), and the built-ins' unions leave only a
few tiles uncertain. A layout that called every tile partial (or uncertain) passes the soundness checks of
test_layout.py, and fails these."""
from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask

from test_layout import BUILTIN_PARAMS, _closed_form, _truth

EXACT = {  # masks whose closed form is exact tile by tile
    "full": M.FULL, "causal": M.CAUSAL, "sliding(37)": M.sliding(37), "window(99,0)": M.window(99, 0),
    "dilated(-64,64,2)": M.Band(-64, 64, 2), "strided(32)": M.strided(32), "cols": M.cols({0, 5, 700, 999}),
    "rows": M.rows(set(range(64, 200))), "blocks(48)": M.blocks(48),
}


@pytest.mark.parametrize("n,block", [(1000, (64, 64)), (777, (96, 40))], ids=["N1000-64x64", "N777-96x40"])
@pytest.mark.parametrize("mask", list(EXACT.values()), ids=list(EXACT))
def test_closed_forms_of_primitives_are_exact_without_settling(mask, n, block):
    cls, unsure = _closed_form(mask, n, n, block)
    assert not unsure.any(), f"{int(unsure.sum())} tiles left uncertain"
    truth = _truth(dense_mask(mask, n, n), *block)
    wrong = (cls != truth).nonzero()
    assert not len(wrong), f"{len(wrong)} tiles misclassified, first at {tuple(wrong[0].tolist())}: " \
                           f"{int(cls[tuple(wrong[0])])} vs {int(truth[tuple(wrong[0])])}"


# the most uncertain tiles the closed form may leave per built-in at N = 1000, 64 x 64 (of 256)
UNSURE_AT_MOST = {"bigbird": 64, "longformer": 4, "longformer_performer": 4, "sparse_transformer": 32}


@pytest.mark.parametrize("name", pd.builtins())
def test_builtin_closed_forms_leave_few_tiles_uncertain(name):
    op = pd.compile(name, backend="reference", **BUILTIN_PARAMS.get(name, {}))
    n, n_k = 1000, (16 if name == "luna" else 1000)
    cls, unsure = _closed_form(op._mask_stage(None).mask, n, n_k, (64, 64))
    assert int(unsure.sum()) <= UNSURE_AT_MOST.get(name, 0), f"{int(unsure.sum())} of {unsure.numel()} uncertain"
    dense = op.mask(n, n_k)
    truth = _truth(dense if dense.dim() == 2 else dense[0], 64, 64)
    assert torch.equal(cls[~unsure], truth[~unsure])
