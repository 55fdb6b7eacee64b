"""The Triton kernels' GQA, query offsets and parallel scans against the fp64 reference (in the interpreter on the
CPU; at real sizes and free of host syncs on a GPU under `-m gpu`).

The reference gets GQA by repeating k and v (autograd sums dk, dv back over the repeats) and query offsets by
evaluating the mask at absolute rows `o + r` and slicing: the kernels index and shift instead. Every case checks
out and every gradient, fresh random inputs, ragged sizes.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from patterndsl.errors import PatternError  # noqa: E402
from patterndsl.ir import mask as M  # noqa: E402
from patterndsl.ir import predicate as P  # noqa: E402
from patterndsl.ir.dense import dense_tile  # noqa: E402
from patterndsl.ir.program import Elu1, Favor, ReluFeatures  # noqa: E402
from patterndsl.backends.reference.features import draw_projection  # noqa: E402
from patterndsl.backends.reference.linear import linear_attention as linear_reference  # noqa: E402
from patterndsl.backends.reference.softmax import softmax_attention as softmax_reference  # noqa: E402
from patterndsl.backends.triton.favor import linear_attention  # noqa: E402
from patterndsl.backends.triton.softmax import softmax_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEV)


def _grads(fn, inputs, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(do.to(dtype))
    return [out.detach().double()] + [x.grad.double() for x in leaves]


def assert_close(gold, got, tol=2e-5, names=("out", "dq", "dk", "dv")):
    for name, g, x in zip(names, gold, got):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        err = (x - g).abs().max().item()
        assert err <= tol * max(1.0, g.abs().max().item()), f"{name}: error {err:.3g}"


def _absolute_allowed(mask, offsets, n_q, n_k, runtime=None):
    """`[B, n_q, n_k]`: the mask at absolute rows `o_b + r` (the extent, max o + n_q, fixes random draws)."""
    extent = max(offsets) + n_q
    dense = dense_tile(mask, torch.arange(extent, device=DEV), torch.arange(n_k, device=DEV), (extent, n_k), runtime)
    dense = dense if dense.dim() == 3 else dense.expand(len(offsets), -1, -1)
    return torch.stack([dense[b, o:o + n_q] for b, o in enumerate(offsets)])


def _repeat(x, group):
    return x.repeat_interleave(group, dim=1)


# ------------------------------------------------------------------------------------------- softmax
GLOBALS = M.global_({0, 37})
SOFTMAX_CASES = {  # B-H-Hkv-Nq-Nk-D, mask, offsets (one per batch row), kwargs
    "B2-H4-Hkv2-Nq37-Nk90-D16-longformer-split": (2, 4, 2, 37, 90, 16, M.sliding(5) | GLOBALS, (40, 40), dict(split=1)),
    "B2-H4-Hkv1-Nq20-Nk70-D32-causal-band": (2, 4, 1, 20, 70, 32, M.CAUSAL, (50, 50), dict(block=(16, 16))),
    "B1-H2-Hkv2-Nq33-Nk64-D16-window-offset13": (1, 2, 2, 33, 64, 16, M.window(9, 0), (13,), {}),
    "B2-H2-Hkv1-Nq17-Nk60-D16-rows-random-where": (
        2, 2, 1, 17, 60, 16, M.Random(2, 16, 5) | M.rows({20}) | M.Where(P.Cmp("==", P.Bin("%", P.J, P.Const(7)),
                                                                                 P.Const(3))), (9, 9),
        dict(block=(16, 16))),
    "B2-H4-Hkv4-Nq15-Nk48-D16-per-row-offsets": (2, 4, 4, 15, 48, 16, M.sliding(3) | GLOBALS, (5, 30), dict(split=1)),
    "B2-H2-Hkv1-Nq21-Nk40-D16-per-row-causal": (2, 2, 1, 21, 40, 16, M.CAUSAL, (0, 19), dict(block=(16, 16))),
}


@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_softmax_gqa_and_offsets_match_reference(case):
    B, H, HKV, NQ, NK, D, mask, offsets, kw = SOFTMAX_CASES[case]
    q, k, v, do = _randn(B, H, NQ, D, seed=1), _randn(B, HKV, NK, D, seed=2), _randn(B, HKV, NK, D, seed=3), \
        _randn(B, H, NQ, D, seed=4)
    kpm = torch.rand(B, NK, generator=torch.Generator().manual_seed(5)) < 0.2
    kpm = kpm.to(DEV)
    allowed = _absolute_allowed(mask, offsets, NQ, NK)
    q_offset = offsets[0] if len(set(offsets)) == 1 else torch.tensor(offsets)

    def ref(a, b, c):
        return softmax_reference(a, _repeat(b, H // HKV), _repeat(c, H // HKV), allowed, D ** -0.5, kpm)[0]

    def fast(a, b, c):
        return softmax_attention(a, b, c, mask, key_padding_mask=kpm, q_offset=q_offset, **kw)

    assert_close(_grads(ref, (q, k, v), do, torch.float64), _grads(fast, (q, k, v), do, torch.float32))


def test_softmax_same_ids_at_offsets():
    """`same(...)` query ids are the call's rows; the kernels index them at absolute positions."""
    B, H, NQ, NK, D, o = 2, 2, 12, 40, 16, 20
    seg_k = torch.tensor([[0] * 25 + [1] * 15, [2] * 40]).to(DEV)
    seg_q = seg_k[:, o:o + NQ]
    mask = M.Same("seg") & M.CAUSAL
    q, k, v, do = (_randn(B, H, n, D, seed=s) for n, s in ((NQ, 6), (NK, 7), (NK, 8), (NQ, 9)))
    full = torch.full((B, o + NQ), -1, dtype=torch.long, device=DEV)
    full[:, o:] = seg_q
    allowed = _absolute_allowed(mask, (o, o), NQ, NK, runtime={"seg": (full, seg_k)})

    def ref(a, b, c):
        return softmax_reference(a, b, c, allowed, D ** -0.5)[0]

    def fast(a, b, c):
        return softmax_attention(a, b, c, mask, runtime={"seg": (seg_q, seg_k)}, q_offset=o, block=(16, 16))

    assert_close(_grads(ref, (q, k, v), do, torch.float64), _grads(fast, (q, k, v), do, torch.float32))


def test_softmax_offset_zero_is_the_default():
    q, k, v = (_randn(1, 2, 30, 16, seed=s).float() for s in (10, 11, 12))
    mask = M.sliding(4) | GLOBALS
    assert torch.equal(softmax_attention(q, k, v, mask), softmax_attention(q, k, v, mask, q_offset=0))
    assert torch.equal(softmax_attention(q, k, v, mask),
                       softmax_attention(q, k, v, mask, q_offset=torch.zeros(1, dtype=torch.int32)))


def test_offset_errors():
    q = torch.randn(2, 1, 8, 16, device=DEV)
    with pytest.raises(PatternError, match=r"q_offset must be an int or an integer tensor \[2\], got torch.int64 "
                                           r"\[3\]"):
        softmax_attention(q, q, q, M.CAUSAL, q_offset=torch.zeros(3, dtype=torch.long))
    with pytest.raises(PatternError, match="q_offset must be an int or an integer tensor .B., got float"):
        softmax_attention(q, q, q, M.CAUSAL, q_offset=1.5)
    with pytest.raises(PatternError, match="q_offset must be >= 0 and < 2..31, got -1"):
        softmax_attention(q, q, q, M.CAUSAL, q_offset=torch.tensor([0, -1]))


# -------------------------------------------------------------------------------------------- linear
LINEAR_CASES = {  # B-H-Nq-Nk-D, feature map, causal, offsets, segment
    "B2-H2-Nq30-Nk90-D16-favor24-causal-offset55-seg32": (2, 2, 30, 90, 16, Favor(24), True, (55, 55), 32),
    "B2-H1-Nq20-Nk40-D16-relu16-causal-per-row": (2, 1, 20, 40, 16, ReluFeatures(16), True, (3, 20), 32),
    "B1-H2-Nq25-Nk25-D16-elu1-causal-offset40": (1, 2, 25, 25, 16, Elu1(), True, (40,), None),
    "B2-H1-Nq100-Nk100-D16-favor70-causal-seg32": (2, 1, 100, 100, 16, Favor(70), True, (0, 0), 32),
    "B1-H2-Nq70-Nk130-D16-favor40-bidir-seg32": (1, 2, 70, 130, 16, Favor(40), False, (0,), 32),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_offsets_and_segments_match_reference(case):
    """Causal query row r of batch b sits at position o_b + r; the reference runs every position up to the last
    query and keeps the rows of the call. Small segments force the parallel scan's prefix combination."""
    B, H, NQ, NK, D, fm, causal, offsets, seg = LINEAR_CASES[case]
    q, k, v, do = _randn(B, H, NQ, D, seed=20), _randn(B, H, NK, D, seed=21), _randn(B, H, NK, D, seed=22), \
        _randn(B, H, NQ, D, seed=23)
    kpm = (torch.rand(B, NK, generator=torch.Generator().manual_seed(24)) < 0.25).to(DEV)
    w = None if isinstance(fm, Elu1) else draw_projection(fm, D).to(DEV)
    extent = max(offsets) + NQ
    q_offset = offsets[0] if len(set(offsets)) == 1 else torch.tensor(offsets)

    def ref(a, b, c):
        if not causal:
            return linear_reference(a, b, c, fm, None if w is None else w.to(a.dtype), False, kpm)
        full = torch.zeros(B, H, extent, D, dtype=a.dtype, device=DEV)
        full = torch.stack([torch.cat([full[i, :, :o], a[i], full[i, :, o + NQ:]], 1) for i, o in enumerate(offsets)])
        out = linear_reference(full, b, c, fm, None if w is None else w.to(a.dtype), True, kpm)
        return torch.stack([out[i, :, o:o + NQ] for i, o in enumerate(offsets)])

    def fast(a, b, c):
        return linear_attention(a, b, c, fm, None if w is None else w.to(a.dtype), causal, kpm, q_offset=q_offset,
                                segment=seg)

    assert_close(_grads(ref, (q, k, v), do, torch.float64), _grads(fast, (q, k, v), do, torch.float32))


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_calls_issue_no_host_sync():
    """After a warm-up call at the shape (which builds and uploads the schedule), forward and backward of every
    kernel family run with `torch.cuda.set_sync_debug_mode("error")`: no device-to-host copy, no `.item()`, no
    boolean indexing (split rows are merged by a kernel), CUDA-graph capturable."""
    from patterndsl.backends.triton.luna import nested_attention
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(2, 4, 1000, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    p = torch.randn(2, 4, 16, 64, device=dev, dtype=dt, requires_grad=True)
    w = draw_projection(Favor(64), 64).to(dev, dt)
    calls = [lambda: softmax_attention(q, k[:, :2], v[:, :2], M.sliding(64) | GLOBALS, split=2),
             lambda: softmax_attention(q, k, v, M.CAUSAL, q_offset=24),
             lambda: linear_attention(q, k, v, Favor(64), w, causal=True),
             lambda: nested_attention(q, k, v, p, q)]
    for call in calls:
        call().float().sum().backward()                     # warm-up: compile, schedule, upload
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call().float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_gqa_offsets_real_sizes(dtype):
    B, H, HKV, NQ, NK, D, o = 2, 8, 2, 1024, 4096, 128, 3072
    mask = M.sliding(256) | M.global_({0, 1, 2})
    q, k, v, do = _randn(B, H, NQ, D, seed=30), _randn(B, HKV, NK, D, seed=31), _randn(B, HKV, NK, D, seed=32), \
        _randn(B, H, NQ, D, seed=33)
    allowed = _absolute_allowed(mask, (o, o), NQ, NK)

    def ref(a, b, c):
        return softmax_reference(a, _repeat(b, H // HKV), _repeat(c, H // HKV), allowed, D ** -0.5)[0]

    gold = _grads(ref, (q, k, v), do, torch.float64)
    low = _grads(ref, (q, k, v), do, dtype)
    got = _grads(lambda a, b, c: softmax_attention(a, b, c, mask, q_offset=o), (q, k, v), do, dtype)
    for name, g, x, r in zip(("out", "dq", "dk", "dv"), gold, got, low):
        assert torch.isfinite(x).all(), name
        assert (x - g).abs().max() <= 5 * (r - g).abs().max() + 1e-4, name
