"""Every lowering the planner can choose equals the float64 reference (outputs and dq, dk, dv), forced by name so
that a candidate the planner rarely picks is still tested: every built-in and random masks of the algebra,
ragged lengths, N_q != N_k, key padding, empty rows, split rows, runtime ids, low precision, a batch of 0."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.backends import declare_all
from patterndsl.backends.reference.softmax import softmax_attention as reference
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.ir.program import Softmax, Stage
from patterndsl.plan.lowering import Problem, declared, lowering

from test_mask_ir import masks

declare_all()
SOFTMAX = [lw.name for lw in declared("softmax", "torch") if lw.name != "torch.flex"]
PATTERNS = {  # built-ins at sizes where every structure (windows, edges, globals, residues) shows at N ~ 50
    "longformer": dict(window=8, globals={0, 17}),
    "longformer-causal-dilated": dict(window=6, dilation=2, causal=True, globals={3}),
    "bigbird": dict(block=4, window=3, globals=1, random_blocks=2),
    "sliding_window": dict(window=7),
    "sparse_transformer": dict(stride=8),
    "sparse_transformer-fixed": dict(stride=8, variant="fixed", summary=2),
    "dilated_window": dict(window=8, dilation=3),
    "prefix_lm": dict(prefix=5),
}


def _stage(name: str) -> Stage:
    return pd.compile(name.split("-")[0], **PATTERNS[name]).ir.stages[0]


def _data(B, H, n_q, n_k, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
            for s in ((B, H, n_q, D), (B, H, n_k, D), (B, H, n_k, D), (B, H, n_q, D))]


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


def _problem(stage, q, k, kpm=None, grad=True):
    return Problem(stage, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.shape[3], q.dtype,
                   q.device, kpm is not None, grad)


def _compare(name, stage, q, k, v, do, kpm=None, runtime=None, atol=1e-10):
    """The lowering `name` against the reference, or False when it does not apply."""
    lw = lowering(name)
    if lw.applies(_problem(stage, q, k, kpm)) is not None:
        return False
    scale = q.shape[-1] ** -0.5
    allowed = dense_mask(stage.mask, q.shape[2], k.shape[2], runtime)
    want = _grads(lambda a, b, c: reference(a, b, c, allowed, scale, kpm)[0], q, k, v, do)
    got = _grads(lambda a, b, c: lw.run(stage, a, b, c, scale=scale, key_padding_mask=kpm, runtime=runtime or {}),
                 q, k, v, do)
    for what, w, x in zip(("out", "dq", "dk", "dv"), want, got):
        assert torch.isfinite(x).all(), f"{name} {what}: NaN/inf"
        err = (x - w).abs().max().item() if w.numel() else 0.0
        assert err <= atol, f"{name} {what}: max error {err:.3g} on {M.to_source(stage.mask)}"
    return True


@pytest.mark.parametrize("name", SOFTMAX)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_lowering_on_every_builtin_fp64(pattern, name):
    stage = _stage(pattern)
    ran = 0
    for n_q, n_k, pad, seed in ((53, 53, False, 1), (47, 47, True, 2), (29, 61, True, 3)):
        q, k, v, do = _data(2, 2, n_q, n_k, 8, seed)
        kpm = None
        if pad:
            kpm = torch.rand(2, n_k, generator=torch.Generator().manual_seed(seed)) < 0.25
            kpm[1, :9] = True                    # leading keys padded: some rows see nothing
        ran += _compare(name, stage, q, k, v, do, kpm)
    if name.startswith("torch.pieces") and pattern in ("longformer", "sliding_window", "dilated_window"):
        assert ran == 3, "the band lowering must run the band patterns"


@settings(max_examples=40, deadline=None)
@given(masks(), st.integers(1, 40), st.integers(1, 40), st.booleans(), st.integers(0, 10_000))
def test_random_masks_every_lowering_fp64(mf, n_q, n_k, pad, seed):
    stage = Stage("out", Softmax(), mf[0])
    q, k, v, do = _data(2, 2, n_q, n_k, 4, seed)
    kpm = (torch.rand(2, n_k, generator=torch.Generator().manual_seed(seed)) < 0.2) if pad else None
    for name in SOFTMAX:
        _compare(name, stage, q, k, v, do, kpm)


@pytest.mark.parametrize("mask,n", [
    (M.inter(M.CAUSAL, M.window(6, 0) | M.strided(6)), 50),     # a window and a strided band: disjoint pieces
    (M.sliding(4, 3) | M.global_({0, 1, 40}), 47),                # residue classes of uneven lengths, globals
    (M.band(3, None) | M.rows({2, 30}), 41),                      # a shifted causal half-plane, empty rows
    (M.band(5, 9), 33),                                           # rows 0..4 see nothing: zeros
    (M.window(9, -3) | M.cols({0}), 40),                          # a window that excludes the diagonal
    (M.window(60, 0) | M.cols({3}), 50),                          # wider than N: runs as causal
], ids=["causal-window-strided", "dilated-globals", "shifted-causal-rows", "empty-rows", "offset-window",
        "window-wider-than-n"])
def test_pieces_shapes_fp64(mask, n):
    for name in ("torch.pieces/bm256", "torch.pieces/bm64"):
        q, k, v, do = _data(2, 3, n, n, 8, seed=n)
        assert _compare(name, Stage("out", Softmax(), mask), q, k, v, do) or name.endswith("bm64")


def test_runtime_ids_fp64():
    seg = torch.tensor([[0] * 12 + [1] * 18, [0] * 5 + [1] * 20 + [2] * 5])
    stage = Stage("out", Softmax(), M.Same("seg") & M.CAUSAL)
    q, k, v, do = _data(2, 2, 30, 30, 4, seed=5)
    ran = [name for name in SOFTMAX if _compare(name, stage, q, k, v, do, runtime={"seg": seg})]
    assert "torch.dense" in ran and "torch.blocksparse/64x64" in ran


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_the_reference(dtype):
    """error vs the fp64 golden <= 2 x the reference's own error in `dtype` (+ a floor), out, dq, dk, dv."""
    stage = Stage("out", Softmax(), M.sliding(5) | M.global_({0}))
    q, k, v, do = _data(1, 2, 77, 77, 16, seed=9)
    allowed, scale = dense_mask(stage.mask, 77, 77), 16 ** -0.5
    gold = _grads(lambda a, b, c: reference(a, b, c, allowed, scale)[0], q, k, v, do)
    low = [x.to(dtype) for x in (q, k, v, do)]
    ref = _grads(lambda a, b, c: reference(a, b, c, allowed, scale)[0], *low)
    for name in SOFTMAX:
        lw = lowering(name)
        if lw.applies(_problem(stage, low[0], low[1])) is not None:
            continue
        got = _grads(lambda a, b, c: lw.run(stage, a, b, c, scale=scale, key_padding_mask=None, runtime={}), *low)
        for what, g, r, x in zip(("out", "dq", "dk", "dv"), gold, ref, got):
            assert x.dtype == dtype, (name, what)
            err, ref_err = (x.double() - g).abs().max().item(), (r.double() - g).abs().max().item()
            assert err <= 2 * ref_err + 1e-3, f"{name} {what}: {err:.3g} vs the reference's {ref_err:.3g}"


@pytest.mark.parametrize("name", SOFTMAX)
def test_batch_of_zero_and_empty_sequences(name):
    stage = _stage("longformer")
    for B, n_q, n_k in ((0, 16, 16), (2, 0, 16), (2, 16, 0)):
        q, k, v, do = _data(B, 2, n_q, n_k, 8, seed=0)
        lw = lowering(name)
        if lw.applies(_problem(stage, q, k)) is not None:
            continue
        out, dq, dk, dv = _grads(lambda a, b, c: lw.run(stage, a, b, c, scale=0.3, key_padding_mask=None,
                                                        runtime={}), q, k, v, do)
        assert out.shape == (B, 2, n_q, 8) and not out.abs().sum() and dk.shape == k.shape, name


def test_flex_lowering_forward():
    """Compiled FlexAttention with the BlockMask built from the layout (forward only on the CPU)."""
    lw = lowering("torch.flex")
    stage = Stage("out", Softmax(), M.sliding(40) | M.global_({0, 200}))
    q, k, v, _ = _data(1, 2, 256, 256, 16, seed=3, dtype=torch.float32)
    if lw.applies(_problem(stage, q, k, grad=False)) is not None:
        pytest.skip(lw.applies(_problem(stage, q, k, grad=False)))
    want = reference(q, k, v, dense_mask(stage.mask, 256, 256), 0.25)[0]
    got = lw.run(stage, q, k, v, scale=0.25, key_padding_mask=None, runtime=None)
    assert (got - want).abs().max() < 1e-4
    assert "no CPU backward" in lw.applies(_problem(stage, q, k, grad=True))


def test_op_runs_the_chosen_lowering_and_batch_zero():
    op = pd.compile("longformer", window=8)
    q = torch.randn(0, 2, 40, 8, requires_grad=True)
    out = op(q, q, q)
    out.sum().backward()
    assert out.shape == (0, 2, 40, 8) and q.grad.shape == q.shape
