"""Near + far in one softmax (docs/language.md §5.6): the reference against the formula written naively, the
torch and Triton backends against the reference (fp64 reference, forward and every gradient, causal and
bidirectional, offsets, padding, grouped heads), stability for large scores, and the error against exact
softmax shrinking with m."""
import math
import os

import pytest
import torch

import patterndsl as pd
from patterndsl.backends.reference.features import draw_projection
from helpers import assert_close

SRC = "pattern nf(w: int = 4, m: int = 16, causal: bool = false) {{ attend softmax over {near}, causal = causal, " \
      "far = favor(m, seed = 2) }}"
NEARS = ["sliding(w)", "sliding(w) | global({0, 33})", "window(6, 1) | where(j % 16 == 5)", "blocks(16)"]


def tensors(B=2, H=4, H_kv=2, n_q=50, n_k=64, D=8, seed=0, size=1.0):
    g = torch.Generator().manual_seed(seed)
    q = size * torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64)
    k = size * torch.randn(B, H_kv, n_k, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, n_k, D + 2, generator=g, dtype=torch.float64)
    kpm = torch.rand(B, n_k, generator=g) < 0.15
    return [x.requires_grad_() for x in (q, k, v)], kpm


def test_reference_equals_the_formula():
    """out_i = (sum_near e^s v + sum_far phi(q).phi(k) v) / (same without v), features written plainly."""
    (q, k, v), kpm = tensors(B=1, H=1, H_kv=1, n_q=9, n_k=12, D=4, size=0.5)
    op = pd.compile(SRC.format(near="sliding(w)"), backend="reference", w=2, m=8, causal=True)
    got = op(q, k, v, key_padding_mask=kpm, q_offset=2)
    w = draw_projection(op.ir.stages[0].score.far.favor, 4).double()
    x = lambda t: t * 4 ** -0.25                                   # noqa: E731
    phi = lambda t: torch.exp(x(t) @ w.T - (x(t) ** 2).sum(-1, keepdim=True) / 2) / math.sqrt(8)   # noqa: E731
    for r in range(9):
        i = r + 2
        num, den = torch.zeros(6, dtype=torch.float64), 0.0
        for j in range(12):
            if kpm[0, j] or j > i:
                continue
            weight = torch.exp(q[0, 0, r] @ k[0, 0, j] / 2) if abs(i - j) <= 2 else phi(q[0, 0, r]) @ phi(k[0, 0, j])
            num, den = num + weight * v[0, 0, j], den + weight
        assert_close(f"row {r}", got[0, 0, r], num / den, atol=1e-12)


@pytest.mark.parametrize("near", NEARS)
@pytest.mark.parametrize("causal,q_offset", [(False, 0), (True, 0), (True, 14), (False, 5)])
def test_torch_equals_reference(near, causal, q_offset):
    xs, kpm = tensors()
    ops = [pd.compile(SRC.format(near=near), backend=b, causal=causal) for b in ("reference", "torch")]
    g = torch.randn(2, 4, 50, 10, dtype=torch.float64)
    res = []
    for op in ops:
        out = op(*xs, key_padding_mask=kpm, q_offset=q_offset)
        res.append([out, *torch.autograd.grad(out, xs, g)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert_close(name, a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_large_scores_do_not_overflow(causal):
    """Scores near 900 (exp overflows float64 at 710): every output and gradient finite and equal."""
    xs, kpm = tensors(size=12.0)
    s = xs[0].detach() @ xs[1].detach().repeat_interleave(2, 1).transpose(-1, -2)
    assert float(s.abs().max()) / 8 ** 0.5 > 400
    res = []
    for b in ("reference", "torch"):
        out = pd.compile(SRC.format(near="sliding(w)"), backend=b, causal=causal)(*xs, key_padding_mask=kpm)
        res.append([out, *torch.autograd.grad(out.sum(), xs)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert bool(torch.isfinite(a).all()), name
        assert_close(name, a, b, atol=1e-8, rtol=1e-7)


def test_float32_is_close_to_float64():
    xs, kpm = tensors()
    want = pd.compile(SRC.format(near=NEARS[1]), backend="reference", causal=True)(*xs, key_padding_mask=kpm)
    got = pd.compile(SRC.format(near=NEARS[1]), backend="torch", causal=True)(
        *(x.detach().float() for x in xs), key_padding_mask=kpm)
    assert_close("fp32", got, want, atol=2e-5, rtol=2e-5)


def test_rows_with_only_padded_keys_output_zeros():
    xs, _ = tensors(n_q=20, n_k=20)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1, 10:] = False
    for b in ("reference", "torch"):
        out = pd.compile(SRC.format(near="sliding(w)"), backend=b, causal=True)(*xs, key_padding_mask=kpm)
        assert bool((out[0] == 0).all()) and bool((out[1, :, :10] == 0).all()), b
        assert bool((out[1, :, 10:] != 0).any()), b


def test_the_far_field_approaches_exact_softmax_as_m_grows():
    """The estimate is unbiased per pair: with more features the output nears softmax over every key."""
    xs, _ = tensors(B=1, H=2, H_kv=2, n_q=64, n_k=64, size=0.6)
    exact = pd.compile("pattern e() { attend softmax }", backend="reference")(*xs)
    errs = []
    for m in (4, 64, 1024):
        out = pd.compile(SRC.format(near="sliding(w)"), backend="torch", m=m)(*xs)
        errs.append(float((out - exact).pow(2).mean().sqrt()))
    assert errs[2] < errs[1] < errs[0], errs


def test_plan_names_the_near_far_kernel():
    assert "FAVOR+ totals minus near terms" in str(pd.compile(SRC.format(near="sliding(w)"), backend="torch")
                                                   .explain(256))


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("near,causal,q_offset", [("sliding(w)", False, 0), ("sliding(w) | global({0, 33})", True, 14),
                                                  ("window(6, 1) | where(j % 16 == 5)", False, 5),
                                                  ("blocks(16)", True, 0)])
def test_triton_equals_reference(near, causal, q_offset):
    """The Triton path (near tiles and their feature products in kernels, far totals in torch) in float32 against
    the fp64 reference on the same values."""
    pytest.importorskip("triton")
    xs, kpm = tensors()
    g = torch.randn(2, 4, 50, 10, dtype=torch.float64)
    res = []
    for b in ("reference", "triton"):
        out = pd.compile(SRC.format(near=near), backend=b, causal=causal)(*xs, key_padding_mask=kpm, q_offset=q_offset)
        res.append([out, *torch.autograd.grad(out, xs, g)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert_close(name, a, b, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_large_scores_do_not_overflow(causal):
    """Scores near 900 (exp overflows float32 at 89): finite, and equal to the reference."""
    pytest.importorskip("triton")
    xs, kpm = tensors(size=12.0, n_q=40, n_k=40)
    res = []
    for b in ("reference", "triton"):
        out = pd.compile(SRC.format(near="sliding(w)"), backend=b, causal=causal)(*xs, key_padding_mask=kpm)
        res.append([out, *torch.autograd.grad(out.sum(), xs)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert bool(torch.isfinite(a).all()), name
        assert_close(name, a, b, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_window_favor_builtin_and_empty_rows():
    """The built-in `window_favor` on Triton equals the reference; rows whose keys are all padding output 0."""
    pytest.importorskip("triton")
    xs, _ = tensors(B=2, H=2, H_kv=2, n_q=40, n_k=40, D=16)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[0] = True
    res = []
    for b in ("reference", "triton"):
        out = pd.compile("window_favor", backend=b, window=8, features=16)(*xs, key_padding_mask=kpm)
        res.append([out, *torch.autograd.grad(out, xs, torch.ones_like(out))])
    assert bool((res[1][0][0] == 0).all())
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert_close(name, a, b, atol=2e-5, rtol=2e-5)
