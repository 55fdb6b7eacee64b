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


# ------------------------------------------------------------------------ query offsets, grouped kv heads
def _grads_of(fn, tensors, do):
    return _grads(lambda *a: fn(*a), *tensors[:3], do) if len(tensors) == 3 else _grads_n(fn, tensors, do)


def _grads_n(fn, tensors, do):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


def _repeat(x, groups):
    return x.repeat_interleave(groups, 1)


def _positioned(name, stage, q, k, v, do, offset, kpm=None, atol=1e-10):
    """Lowering `name` with k, v of fewer heads and query row r at `offset + r`, against the reference on
    repeated K/V and the mask at those positions; False when the lowering declares it cannot run it."""
    lw = lowering(name)
    G = q.shape[1] // k.shape[1]
    problem = Problem(stage, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.shape[3], q.dtype,
                      q.device, kpm is not None, True, kv_heads=k.shape[1], q_offset=offset)
    why = lw.applies(problem)
    if why is not None:
        return why
    scale = q.shape[-1] ** -0.5
    allowed = dense_mask(stage.mask, q.shape[2], k.shape[2], q_offset=offset)
    want = _grads(lambda a, b, c: reference(a, _repeat(b, G), _repeat(c, G), allowed, scale, kpm)[0], q, k, v, do)
    got = _grads(lambda a, b, c: lw.run(stage, a, b, c, scale=scale, key_padding_mask=kpm, runtime={},
                                        q_offset=offset), q, k, v, do)
    for what, w, x in zip(("out", "dq", "dk", "dv"), want, got):
        assert x.shape == w.shape, f"{name} {what}: shape {tuple(x.shape)}, want {tuple(w.shape)}"
        err = (x - w).abs().max().item() if w.numel() else 0.0
        assert torch.isfinite(x).all() and err <= atol, \
            f"{name} {what}: max error {err:.3g} at offset {offset} on {M.to_source(stage.mask)}"
    return None


@pytest.mark.parametrize("name", SOFTMAX)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_lowering_with_offsets_and_grouped_heads_fp64(pattern, name):
    stage = _stage(pattern)
    ran = 0
    for n_q, n_k, offset, kv_heads, pad, seed in ((20, 53, 33, 2, False, 4), (17, 61, 9, 1, True, 5),
                                                   (53, 53, 0, 2, True, 6), (1, 70, 69, 1, False, 7),
                                                   (30, 45, 4, 4, False, 8)):
        q, _, _, do = _data(2, 4, n_q, n_k, 8, seed)
        _, k, v, _ = _data(2, kv_heads, n_q, n_k, 8, seed + 100)
        kpm = None
        if pad:
            kpm = torch.rand(2, n_k, generator=torch.Generator().manual_seed(seed)) < 0.3
            kpm[1, :6] = True
        why = _positioned(name, stage, q, k, v, do, offset, kpm)
        ran += why is None
        if why is not None:
            assert offset and "offset" in why or "decompos" in why or "bands" in why or "window" in why \
                or "causal" in why, f"{name}: {why}"
    if name not in ("torch.causal",) and not name.startswith("torch.pieces"):
        assert ran, f"{name} ran no case"


def test_causal_lowering_declares_no_offset():
    stage = Stage("out", Softmax(), M.CAUSAL)
    q, k, v, do = _data(1, 4, 16, 40, 8, seed=9)
    assert _positioned("torch.causal", stage, q, k[:, :2], v[:, :2], do, 0) is None          # grouped heads run
    assert "offset" in _positioned("torch.causal", stage, q, k, v, do, 24)
    for name in ("torch.pieces/bm256", "torch.dense", "torch.blocksparse/64x64"):          # which run it
        assert _positioned(name, stage, q, k[:, :1], v[:, :1], do, 24) is None, name


def test_pieces_offsets_across_residues_fp64():
    """Dilated and strided bands at every offset residue (the queries' classes move with the offset)."""
    for mask in (M.sliding(6, dilation=3) | M.global_({0, 13}), M.inter(M.CAUSAL, M.window(5, 0) | M.strided(4))):
        stage = Stage("out", Softmax(), mask)
        for offset in range(0, 7):
            q, _, _, do = _data(1, 4, 19, 45, 8, seed=offset)
            _, k, v, _ = _data(1, 2, 19, 45, 8, seed=offset + 50)
            for name in ("torch.pieces/bm256", "torch.pieces/bm64"):
                why = _positioned(name, stage, q, k, v, do, offset)
                assert why is None or "window" in why, f"{name}: {why}"


@pytest.mark.parametrize("name", SOFTMAX)
def test_op_per_batch_offsets_through_each_lowering(name):
    """A LongTensor of offsets runs one call per distinct offset; each lowering, pinned, equals the reference."""
    from patterndsl.plan.select import pin
    op = pd.compile("longformer", window=5, globals={0, 9})
    ref = pd.compile("longformer", window=5, globals={0, 9}, backend="reference")
    q, _, _, _ = _data(3, 4, 12, 40, 8, seed=11)
    _, k, v, _ = _data(3, 2, 12, 40, 8, seed=12)
    offsets = torch.tensor([3, 28, 3])
    try:
        with pin(name):
            got = op(q, k, v, q_offset=offsets)
    except pd.PatternError as e:
        assert "cannot run" in e.message and name == "torch.causal", e.message
        return
    assert (got - ref(q, k, v, q_offset=offsets)).abs().max() < 1e-10


def _linear_positioned(name, fm, q, k, v, do, offset, kpm):
    from patterndsl.backends.reference.linear import linear_attention
    from patterndsl.ir.program import Linear
    stage = Stage("out", Linear(fm), M.CAUSAL)
    w = draw_projection(fm, 8) if hasattr(fm, "features") else None
    G = q.shape[1] // k.shape[1]
    lw = lowering(name)
    why = lw.applies(Problem(stage, *q.shape[:3], k.shape[2], 8, 8, q.dtype, q.device, kpm is not None, True,
                             kv_heads=k.shape[1], q_offset=offset))
    if why is not None:
        return why
    want = _grads(lambda a, b, c: linear_attention(a, _repeat(b, G), _repeat(c, G), fm, w, causal=True,
                                                   key_padding_mask=kpm, q_offset=offset), q, k, v, do)
    got = _grads(lambda a, b, c: lw.run(stage, a, b, c, projection=w, key_padding_mask=kpm, q_offset=offset),
                 q, k, v, do)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-10, f"{name} {what} offset {offset}"
    return None


def draw_projection(fm, d):
    from patterndsl.backends.reference.features import draw_projection as draw
    return draw(fm, d).double()


@pytest.mark.parametrize("name", [lw.name for lw in declared("linear", "torch")])
def test_linear_lowerings_offsets_and_grouped_heads_fp64(name):
    from patterndsl.ir.program import Favor, ReluFeatures
    ran = 0
    for fm in (Favor(16), ReluFeatures(16)):
        for n_q, n_k, offset, kv_heads in ((9, 30, 21, 2), (12, 12, 0, 2), (7, 25, 11, 4), (10, 10, 0, 4)):
            q, _, _, do = _data(2, 4, n_q, n_k, 8, seed=n_q)
            _, k, v, _ = _data(2, kv_heads, n_q, n_k, 8, seed=n_q + 1)
            kpm = torch.rand(2, n_k, generator=torch.Generator().manual_seed(1)) < 0.2
            why = _linear_positioned(name, fm, q, k, v, do, offset, kpm)
            ran += why is None
            assert why is None or any(w in why for w in ("grouped", "offset", "causal", "FAVOR", "N_q")), why
    assert ran or name in ("torch.favor",), f"{name} ran no case"


@pytest.mark.parametrize("name", [lw.name for lw in declared("nested", "torch")])
def test_nested_lowerings_offsets_and_grouped_heads_fp64(name):
    from patterndsl.backends.reference.nested import nested_attention
    stage = pd.compile("luna_causal", length=5).ir.stages[0]
    g = torch.Generator().manual_seed(5)
    for n_q, n_k, offset, kv_heads in ((6, 20, 14, 2), (15, 15, 0, 1), (15, 15, 0, 3)):
        q = torch.randn(2, 6, n_q, 8, generator=g, dtype=torch.float64)
        k, v, c = (torch.randn(2, kv_heads, n_k, 8, generator=g, dtype=torch.float64) for _ in range(3))
        p = torch.randn(2, 6, 5, 8, generator=g, dtype=torch.float64)
        do = torch.randn(2, 6, n_q, 8, generator=g, dtype=torch.float64)
        G = 6 // kv_heads
        why = lowering(name).applies(Problem(stage, 2, 6, n_q, n_k, 8, 8, torch.float64, torch.device("cpu"),
                                             False, True, 5, kv_heads=kv_heads, q_offset=offset))
        if why is not None:
            assert any(w in why for w in ("grouped", "offset", "queries as keys")), why
            continue
        want = _grads_of(lambda a, b, cc, pp, ck: nested_attention(a, _repeat(b, G), _repeat(cc, G), pp,
                                                                   _repeat(ck, G), q_offset=offset), (q, k, v, p, c), do)
        got = _grads_of(lambda a, b, cc, pp, ck: lowering(name).run(stage, a, b, cc, p=pp, c=ck, q_offset=offset),
                        (q, k, v, p, c), do)
        for what, a, b in zip(("out", "dq", "dk", "dv", "dp", "dc"), got, want):
            assert (a - b).abs().max() <= 1e-10, f"{name} {what} offset {offset} kv heads {kv_heads}"


def test_flex_lowering_offset_and_grouped_heads_forward():
    lw = lowering("torch.flex")
    stage = Stage("out", Softmax(), M.sliding(40) | M.global_({0, 200}))
    q, _, _, _ = _data(1, 4, 128, 256, 16, seed=3, dtype=torch.float32)
    _, k, v, _ = _data(1, 2, 128, 256, 16, seed=4, dtype=torch.float32)
    problem = Problem(stage, 1, 4, 128, 256, 16, 16, kv_heads=2, q_offset=128)
    if lw.applies(problem) is not None:
        pytest.skip(lw.applies(problem))
    want = reference(q, _repeat(k, 2), _repeat(v, 2), dense_mask(stage.mask, 128, 256, q_offset=128), 0.25)[0]
    got = lw.run(stage, q, k, v, scale=0.25, key_padding_mask=None, runtime=None, q_offset=128)
    assert (got - want).abs().max() < 1e-4
