"""The torch backend against the float64 reference: outputs and every gradient, on fresh random inputs, for
random masks of the algebra (ragged sizes, N_q != N_k, padding, empty rows, split rows, runtime ids), every
built-in and its variants, and low precision; plus the bounded working set and the custom op's registration."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.backends.reference.softmax import softmax_attention as reference
from patterndsl.backends.torch import SHORT_SIDE
from patterndsl.backends.torch.schedule import make_schedule
from patterndsl.backends.torch.softmax import softmax_attention
from patterndsl.errors import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.op import AttentionOp

from test_gradcheck import EXTRA, VARIANTS, _inputs, _outputs_and_grads
from test_mask_ir import masks


def _data(B, H, NQ, NK, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(*s, generator=g, dtype=torch.float64)
                   for s in ((B, H, NQ, D), (B, H, NK, D), (B, H, NK, D + 1), (B, H, NQ, D + 1)))
    return [x.to(dtype) for x in (q, k, v, do)]


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


def _compare(mask, q, k, v, do, kpm=None, runtime=None, atol=1e-10, **kw):
    allowed = dense_mask(mask, q.shape[2], k.shape[2], runtime)
    scale = q.shape[-1] ** -0.5
    want = _grads(lambda a, b, c: reference(a, b, c, allowed, scale, kpm)[0], q, k, v, do)
    got = _grads(lambda a, b, c: softmax_attention(a, b, c, mask, key_padding_mask=kpm, runtime=runtime, **kw),
                 q, k, v, do)
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        err = (x - w).abs().max().item() if w.numel() else 0.0
        assert err <= atol, f"{name}: max error {err:.3g} for {M.to_source(mask)}"


@settings(max_examples=60, deadline=None)
@given(masks(), st.integers(1, 45), st.integers(1, 45), st.sampled_from([(4, 4), (8, 16), (16, 8), (5, 3)]),
       st.sampled_from([None, 1, 2]), st.integers(0, 10_000))
def test_random_masks_fp64(mf, n_q, n_k, block, split, seed):
    q, k, v, do = _data(2, 2, n_q, n_k, 4, seed)
    kpm = torch.rand(2, n_k, generator=torch.Generator().manual_seed(seed)) < 0.2
    _compare(mf[0], q, k, v, do, kpm=kpm if seed % 2 else None, block=block, split=split)


@pytest.mark.parametrize("mask,n", [
    (M.sliding(6) | M.global_({0, 1, 40}), 97),          # global rows split, ragged edge
    (M.window(8, 0, 2) | M.cols({0, 3}), 70),            # causal dilated window with sinks
    (M.sliding(3) - M.rows({5, 6, 7}), 33),              # empty rows give zeros
    (M.Random(2, 4, 7) | M.sliding(2), 64),              # BigBird's random blocks
    (M.blocks(10) & M.CAUSAL, 50),
], ids=["B2-H3-N97-globals", "N70-dilated-sinks", "N33-empty-rows", "N64-random", "N50-blocks-causal"])
def test_named_masks_fp64(mask, n):
    q, k, v, do = _data(2, 3, n, n, 8, seed=n)
    _compare(mask, q, k, v, do, block=(16, 16))
    _compare(mask, q, k, v, do, block=(8, 16), split=1)   # every row cut into one-tile pieces


def test_empty_rows_and_fully_padded_batch_rows_are_zero():
    q, k, v, do = _data(2, 1, 20, 20, 4, seed=3)
    kpm = torch.zeros(2, 20, dtype=torch.bool)
    kpm[1] = True                                        # batch row 1: every key is padding
    mask = M.sliding(2) - M.rows({4})
    out, lse = softmax_attention(q, k, v, mask, key_padding_mask=kpm, block=(8, 8), return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, 4], torch.zeros_like(out[0, :, 4]))
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, 4]).all()
    _compare(mask, q, k, v, do, kpm=kpm, block=(8, 8))


def test_runtime_segment_ids_fp64():
    q, k, v, do = _data(2, 2, 30, 30, 4, seed=5)
    seg = torch.tensor([[0] * 12 + [1] * 18, [0] * 5 + [1] * 20 + [2] * 5])
    mask = M.Same("seg") & M.CAUSAL
    _compare(mask, q, k, v, do, runtime={"seg": seg}, block=(8, 8))
    _compare(mask, q, k, v, do, runtime={"seg": (seg, seg)}, block=(8, 8), split=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_low_precision_no_worse_than_the_reference(dtype):
    """error vs the fp64 golden <= 2 x the reference's own error in `dtype` (+ a floor), for out, dq, dk, dv."""
    mask = M.sliding(5) | M.global_({0})
    q, k, v, do = _data(1, 2, 77, 77, 16, seed=9)
    allowed, scale = dense_mask(mask, 77, 77), 16 ** -0.5
    gold = _grads(lambda a, b, c: reference(a, b, c, allowed, scale)[0], q, k, v, do)
    low = [x.to(dtype) for x in (q, k, v, do)]
    ref = _grads(lambda a, b, c: reference(a, b, c, allowed, scale)[0], *low)
    got = _grads(lambda a, b, c: softmax_attention(a, b, c, mask, block=(16, 16)), *low)
    for name, g, r, x in zip(("out", "dq", "dk", "dv"), gold, ref, got):
        assert x.dtype == dtype, name
        err, ref_err = (x.double() - g).abs().max().item(), (r.double() - g).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, f"{name}: {err:.3g} vs the reference's {ref_err:.3g}"


# ------------------------------------------------------------------------------------------ whole programs
def _all_ops(backend):
    ops = {f"builtin-{n}": (n, {}) for n in pd.builtins()}
    ops.update(VARIANTS)
    return {k: (lambda n=n, kw=kw: pd.compile(n, backend=backend, **kw)) for k, (n, kw) in ops.items()}


@pytest.mark.parametrize("name", sorted(_all_ops("torch")) + [f"ir-{k}" for k in EXTRA])
def test_programs_equal_the_reference_fp64_B2_N37_D8(name):
    if name.startswith("ir-"):
        ir = EXTRA[name[3:]]
        torch_op, ref_op = AttentionOp(None, ir, backend="torch"), AttentionOp(None, ir, backend="reference")
    else:
        torch_op, ref_op = _all_ops("torch")[name](), _all_ops("reference")[name]()
    assert set(torch_op.backends().values()) == {"torch"}
    tensors, runtime, kpm = _inputs(torch_op, torch.float64, B=2, N=37, D=8, seed=4)
    want_out, want_grad = _outputs_and_grads(ref_op, tensors, runtime, kpm)
    got_out, got_grad = _outputs_and_grads(torch_op, tensors, runtime, kpm)
    for i, (a, b) in enumerate(zip(got_out, want_out)):
        assert (a - b).abs().max() <= 1e-10, f"output {i}"
    for n in tensors:
        assert (got_grad[n] - want_grad[n]).abs().max() <= 1e-9, f"d{n}"


def test_auto_picks_torch_on_the_cpu():
    assert set(pd.compile("longformer").backends("cpu").values()) == {"torch"}


def test_short_full_stages_run_densely():
    """Luna's pack/unpack (l = 16 packed rows) take the dense path; a long full stage is tiled."""
    from patterndsl.backends.torch import BACKEND
    luna = pd.compile("luna", backend="torch")
    kinds = {st.name: BACKEND.kernel(st, 16 if st.query != "input" else 500, 500 if st.keys == "input" else 16)
             for st in luna.ir.stages}
    assert all(k.startswith("dense") for k in kinds.values()), kinds
    full = pd.compile("pattern f() { attend softmax over full }", backend="torch").ir.stages[0]
    assert BACKEND.kernel(full, SHORT_SIDE + 1, SHORT_SIDE + 1).startswith("block-sparse")


# ---------------------------------------------------------------------------------------- working set
def test_chunks_are_bounded_by_the_budget():
    """No chunk holds more than `budget` scores (plus one item): the working set is O(budget), never N x N."""
    budget = 1 << 16
    mask = M.sliding(100) | M.global_({0, 5000})
    sched = make_schedule(mask, 8192, 8192, 64, 64, heads=2, budget=budget)
    biggest = max(2 * c.k_tiles.numel() * 64 * 64 for c in sched.chunks)
    one_item = max(2 * c.k_tiles.shape[1] * 64 * 64 for c in sched.chunks)
    assert biggest <= budget + one_item
    assert max(c.k_tiles.shape[1] for c in sched.chunks) < sched.grid.nkb // 4    # long rows were split


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,message", [
    ({"block": (16,)}, "block must be (BLOCK_M, BLOCK_N), two ints >= 1, got (16,)"),
    ({"block": (0, 16)}, "block must be (BLOCK_M, BLOCK_N), two ints >= 1, got (0, 16)"),
    ({"split": 0}, "split (most key tiles per work item) must be an int >= 1, got 0"),
    ({"split": True}, "split (most key tiles per work item) must be an int >= 1, got True"),
])
def test_option_errors(kw, message):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(PatternError) as e:
        softmax_attention(q, q, q, M.sliding(1), **kw)
    assert message in str(e.value)


def test_missing_runtime_ids_error():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(PatternError, match="the mask reads runtime ids 'seg', but none were given"):
        softmax_attention(q, q, q, M.Same("seg"))
    with pytest.raises(PatternError, match=r"seg \(key ids\) must be an integer tensor \[1, 8\], got torch.float32"):
        softmax_attention(q, q, q, M.Same("seg"), runtime={"seg": (torch.zeros(1, 8, dtype=torch.long),
                                                                     torch.zeros(1, 8))})


def test_custom_op_registration():
    """Schema, fake tensors, autograd registration and AOT dispatch of patterndsl::torch_softmax."""
    from patterndsl.backends.custom import register
    from patterndsl.backends.torch import softmax as S
    q, k, v, _ = (x.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()   # layers' strides
                  for x in _data(1, 2, 40, 40, 16, seed=14))
    kpm = torch.zeros(1, 40, dtype=torch.bool)
    kpm[0, -3:] = True
    key = register("torch_softmax", M.sliding(3) | M.global_({0}), 16, 16, 2)
    torch.library.opcheck(S._softmax_op, (q, k, v, kpm, [], key, 0.25, 3))
    k1, v1 = (x[:, :1].detach().requires_grad_() for x in (k, v))                 # grouped kv heads
    torch.library.opcheck(S._softmax_op, (q, k1, v1, kpm, [], key, 0.25, 0))
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = S._softmax_op(q, k, v, kpm, [], key, 0.25, 3)
    do = torch.randn_like(out)
    torch.library.opcheck(S._softmax_bwd_op, (do, None, q, k, v, out, lse, kpm, [], key, 0.25, 3))


# ------------------------------------------------------------------------------------------------ FAVOR+
@pytest.mark.parametrize("nq,nk,padding", [(11, 13, False), (16, 9, True), (1, 1, False)],
                         ids=["B2-H3-NQ11-NK13", "B2-H3-NQ16-NK9-padded", "B2-H3-N1"])
def test_favor_equals_the_reference_fp64(nq, nk, padding):
    """The hand-written backward (stabiliser gradients included) against autograd through the reference."""
    from patterndsl.backends.reference.features import draw_projection
    from patterndsl.backends.reference.linear import linear_attention
    from patterndsl.backends.torch.favor import favor_attention
    from patterndsl.ir.program import Favor
    fm = Favor(16, eps=1e-3)
    w = draw_projection(fm, 8)
    g = torch.Generator().manual_seed(nq * nk)
    kpm = None
    if padding:
        kpm = torch.rand(2, nk, generator=g) < 0.3
        kpm[1] = True                                            # batch row 1: no valid key, output 0
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    do = torch.randn(2, 3, nq, 8, generator=g, dtype=torch.float64)
    want = _grads(lambda a, b, c: linear_attention(a, b, c, fm, w, key_padding_mask=kpm), q, k, v, do)
    got = _grads(lambda a, b, c: favor_attention(a, b, c, w, fm.eps, key_padding_mask=kpm), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max() <= 1e-11, name
    if padding:
        assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))


def test_favor_custom_op_registration():
    from patterndsl.backends.reference.features import draw_projection
    from patterndsl.backends.torch import favor as F
    from patterndsl.ir.program import Favor
    w = draw_projection(Favor(16), 8).float()
    q, k, v, _ = (x.float().requires_grad_() for x in _data(1, 2, 12, 12, 8, seed=2))   # v: D_v = 9
    kpm = torch.zeros(1, 12, dtype=torch.bool)
    kpm[0, -2:] = True
    torch.library.opcheck(F._favor_op, (q, k, v, w, kpm, 1e-4))
