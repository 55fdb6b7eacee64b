"""Query positions: with `q_offset = o`, query row r is at absolute position o + r in every evaluation path (dense
masks, points, layouts, band bounds, the torch schedule, Flex export, the generated Triton mask functions and
the Triton kernels run with them): each equals rows o .. o + n_q - 1 of the mask of o + n_q queries."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask, mask_at
from patterndsl.ir.program import ProgramIR, Softmax, Stage
from patterndsl.op import AttentionOp
from patterndsl.plan.layout import EMPTY, band_bounds, block_layout, tile_layout
from test_layout import _sound, _truth, rich_masks
from test_mask_ir import masks

SEG = M.Same("seg")


def _rows_of_full(m, o, n_q, n_k, runtime=None):
    return dense_mask(m, o + n_q, n_k, runtime)[..., o:, :]


@settings(max_examples=120, deadline=None)
@given(rich_masks(), st.integers(0, 40), st.integers(1, 30), st.integers(1, 40))
def test_dense_with_an_offset_is_rows_of_the_full_mask(m, o, n_q, n_k):
    assert torch.equal(dense_mask(m, n_q, n_k, q_offset=o), _rows_of_full(m, o, n_q, n_k))


def test_runtime_ids_belong_to_the_rows_of_the_call():
    ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [5] * 20])
    m = SEG & M.CAUSAL
    full = dense_mask(m, 20, 20, {"seg": ids})
    part = dense_mask(m, 12, 20, {"seg": (ids[:, 8:], ids)}, q_offset=8)
    assert torch.equal(part, full[:, 8:])


@settings(max_examples=60, deadline=None)
@given(rich_masks(), st.integers(0, 30), st.integers(1, 20), st.integers(1, 30))
def test_points_with_an_offset_match_dense(m, o, n_q, n_k):
    g = torch.Generator().manual_seed(o * 1000 + n_q * 31 + n_k)
    i = torch.randint(0, n_q, (5, 3, 1), generator=g)
    j = torch.randint(0, n_k, (5, 1, 4), generator=g)
    want = dense_mask(m, n_q, n_k, q_offset=o)[i, j]
    assert torch.equal(mask_at(m, i, j, (n_q, n_k), q_offset=o), want)


@settings(max_examples=100, deadline=None)
@given(masks(), st.integers(0, 50), st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4, 8]),
       st.sampled_from([2, 5, 8]))
def test_layouts_with_an_offset_are_the_dense_tiles(mf, o, n_q, n_k, bm, bn):
    m, _ = mf
    truth = _truth(dense_mask(m, n_q, n_k, q_offset=o), bm, bn)
    assert torch.equal(block_layout(m, n_q, n_k, bm, bn, q_offset=o), truth)
    sparse = tile_layout(m, n_q, n_k, bm, bn, q_offset=o)
    assert torch.equal(sparse.dense(), truth) and sparse.q_offset == o


@settings(max_examples=60, deadline=None)
@given(rich_masks(), st.integers(0, 50), st.integers(1, 60), st.integers(1, 60))
def test_layouts_with_an_offset_are_sound_for_rich_masks(m, o, n_q, n_k):
    truth = _truth(dense_mask(m, n_q, n_k, q_offset=o), 4, 8)
    _sound(tile_layout(m, n_q, n_k, 4, 8, q_offset=o).dense(), truth)


@pytest.mark.parametrize("band", [M.sliding(5), M.CAUSAL, M.window(0, 9, 2), M.Band(3, 40, 1)], ids=str)
@pytest.mark.parametrize("by", ["rows", "cols"])
@pytest.mark.parametrize("offset", [0, 7, 64], ids=lambda o: f"o{o}")
def test_band_bounds_with_an_offset(band, by, offset):
    layout = block_layout(band, 30, 90, 8, 16, q_offset=offset)
    layout = layout if by == "rows" else layout.t()
    first, last = band_bounds(band, 30, 90, 8, 16, by=by, q_offset=offset)
    for a in range(layout.shape[0]):
        nz = (layout[a] != EMPTY).nonzero().flatten().tolist()
        span = list(range(int(first[a]), int(last[a]) + 1))
        assert nz == span if band.step == 1 else set(nz) <= set(span)


def test_layout_prints_its_offset():
    assert "queries from position 5" in str(tile_layout(M.CAUSAL, 4, 12, 4, 4, q_offset=5))


@pytest.mark.parametrize("mask", [M.sliding(3) | M.global_({0, 9}), M.Random(2, 4, 1) | M.blocks(6)], ids=str)
def test_torch_schedule_with_an_offset(mask):
    from patterndsl.backends.torch.blocksparse import blocksparse_fwd
    from patterndsl.backends.reference.softmax import softmax_attention
    from patterndsl.backends.torch.schedule import make_schedule
    o, n_q, n_k = 13, 11, 24
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (n_q, n_k, n_k))
    sched = make_schedule(mask, n_q, n_k, 4, 8, heads=2, split=2, q_offset=o)
    got = blocksparse_fwd(q, k, v, sched, 0.3)[0]
    want = softmax_attention(q, k, v, dense_mask(mask, n_q, n_k, q_offset=o), 0.3)[0]
    assert_close("out", got, want, atol=1e-12)


# ------------------------------------------------------------------------------------------------- flex
@pytest.mark.parametrize("mask", [M.CAUSAL, M.sliding(2) | M.rows({15, 16}), M.Random(1, 4, 2), M.cols(range(20))],
                         ids=str)
def test_flex_mask_mod_with_an_offset(mask):
    from torch.nn.attention.flex_attention import create_mask
    from patterndsl.export.flex import to_flex
    op = AttentionOp(None, ProgramIR("p", (Stage("out", Softmax(), mask),), ("out",)), backend="reference")
    mod = to_flex(op, n_q=9, n_k=30, q_offset=14)
    assert torch.equal(create_mask(mod, None, None, 9, 30)[0, 0], _rows_of_full(mask, 14, 9, 30))


def test_flex_same_ids_with_an_offset():
    from torch.nn.attention.flex_attention import create_mask
    from patterndsl.export.flex import to_flex
    op = AttentionOp(None, ProgramIR("p", (Stage("out", Softmax(), SEG & M.CAUSAL),), ("out",)), backend="reference")
    ids = torch.tensor([[0] * 6 + [1] * 10])
    mod = to_flex(op, n_q=6, n_k=16, runtime={"seg": (ids[:, 10:], ids)}, q_offset=10)
    assert torch.equal(create_mask(mod, 1, None, 6, 16)[0, 0], dense_mask(SEG & M.CAUSAL, 16, 16, {"seg": ids})[0, 10:])


def test_flex_offset_must_be_a_natural_number():
    from patterndsl.errors import PatternError
    from patterndsl.export.flex import to_flex
    op = AttentionOp(None, ProgramIR("p", (Stage("out", Softmax(), M.CAUSAL),), ("out",)), backend="reference")
    with pytest.raises(PatternError, match="q_offset must be an int >= 0, got -1"):
        to_flex(op, q_offset=-1)


# ----------------------------------------------------------------------------------------------- triton
needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")
TRITON_MASKS = {"causal": M.CAUSAL, "sliding-globals": M.sliding(3) | M.global_({2, 40}),
                "random-blocks": M.Random(2, 8, 5) | M.blocks(16), "same-causal": SEG & M.CAUSAL}


@needs_triton
@pytest.mark.parametrize("name", list(TRITON_MASKS))
def test_generated_mask_reads_the_offset_from_aux(name):
    pytest.importorskip("triton")
    from test_codegen import _generated
    mask = TRITON_MASKS[name]
    ids = torch.tensor([[0] * 20 + [1] * 30])
    runtime = {"seg": (ids[:, 17:], ids)} if name == "same-causal" else None
    got = _generated(mask, 33, 50, runtime, q_offset=17)
    want = dense_mask(mask, 33, 50, {"seg": (ids[:, 17:], ids)}, q_offset=17)
    assert torch.equal(got, want[0] if want.dim() == 3 else want)


@needs_triton
@pytest.mark.parametrize("name", ["causal", "sliding-globals", "random-blocks"])
def test_kernels_run_an_offset_unchanged(name):
    """The kernels pass their row index to `mask_tile` as today; the plan and AUX carry the offset."""
    pytest.importorskip("triton")
    from patterndsl.backends.reference.softmax import softmax_attention
    from patterndsl.backends.triton.codegen import mask_module
    from patterndsl.backends.triton.softmax_bwd import softmax_bwd
    from patterndsl.backends.triton.softmax_fwd import softmax_fwd
    from patterndsl.backends.triton.tiles import build_aux, make_tile_plan
    mask, o, n_q, n_k, dev = TRITON_MASKS[name], 21, 27, 48, "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(1, 2, n_q, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 2, n_k, 16, generator=g) for _ in range(2))
    plan = make_tile_plan(mask, n_q, n_k, 16, 16, split=2, device=dev, q_offset=o)
    aux = build_aux(mask, n_q, n_k, 1, None, dev, q_offset=o)
    x = [t.to(dev).contiguous() for t in (q, k, v, do)]
    out, lse = softmax_fwd(*x[:3], plan, mask_module(mask), 0.25, None, aux)
    grads = softmax_bwd(x[3], *x[:3], out, lse, plan, mask_module(mask), 0.25, None, aux)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = softmax_attention(*leaves, dense_mask(mask, n_q, n_k, q_offset=o), 0.25)[0]
    want.backward(do.double())
    assert_close("out", out, want, atol=2e-5)
    for nm, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert_close(nm, got, leaf.grad, atol=2e-5)
