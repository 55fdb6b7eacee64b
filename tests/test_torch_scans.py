"""The torch backend's scans against their naive twins in the reference: chunked causal linear attention at
every chunk size (one key, ragged, one chunk, larger than N) and causal Luna by cumulative sums, outputs and
every gradient in float64, with key padding."""
import pytest
import torch

from helpers import assert_close
from patterndsl.backends.reference.features import draw_projection
from patterndsl.backends.reference.linear import linear_attention as naive_linear
from patterndsl.backends.reference.nested import nested_attention as naive_nested
from patterndsl.backends.torch.linear_scan import linear_attention
from patterndsl.backends.torch.nested_scan import nested_attention
from patterndsl.ir.program import Elu1, Favor, ReluFeatures

FMS = {"favor": Favor(16), "relu": ReluFeatures(12), "elu1": Elu1()}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(fn, inputs, do):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


def _padding(B, N):
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[0, :3] = kpm[-1, N // 2:N // 2 + 4] = kpm[-1, -2:] = True
    return kpm


@pytest.mark.parametrize("chunk", [1, 7, 16, 70, 1000], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("fm", list(FMS.values()), ids=list(FMS))
def test_linear_scan_equals_the_reference_B2_H2_N70_D8(fm, causal, chunk):
    q, k, v, do = (_rand(2, 2, 70, 8, seed=s) for s in range(4))
    w = draw_projection(fm, 8) if hasattr(fm, "features") else None
    kpm = _padding(2, 70)
    want = _grads(lambda a, b, c: naive_linear(a, b, c, fm, w, causal, kpm), (q, k, v), do)
    got = _grads(lambda a, b, c: linear_attention(a, b, c, fm, w, causal, kpm, chunk=chunk), (q, k, v), do)
    for name, g, x in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(name, g, x, atol=1e-11)


@pytest.mark.parametrize("n_q,n_k", [(9, 6), (6, 9)], ids=["Nq9-Nk6", "Nq6-Nk9"])
def test_linear_scan_causal_different_lengths(n_q, n_k):
    fm = Favor(8)
    q, k, v = _rand(1, 2, n_q, 4, seed=4), _rand(1, 2, n_k, 4, seed=5), _rand(1, 2, n_k, 4, seed=6)
    w = draw_projection(fm, 4)
    assert_close("out", linear_attention(q, k, v, fm, w, True, chunk=4), naive_linear(q, k, v, fm, w, True),
                 atol=1e-12)


def test_linear_scan_does_not_overflow_fp32():
    """Keys far larger than the first ones: the running max rescales the state instead of overflowing."""
    fm = Favor(32)
    q, k, v = (_rand(1, 1, 80, 16, seed=s).float() for s in (14, 15, 16))
    k = k * torch.linspace(0.1, 12, 80)[None, None, :, None]
    w = draw_projection(fm, 16)
    out = linear_attention(q, k, v, fm, w.float(), causal=True, chunk=16)
    assert torch.isfinite(out).all()
    assert_close("out", out, naive_linear(q.double(), k.double(), v.double(), fm, w, causal=True), atol=1e-4)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_nested_scan_equals_the_reference_B2_H2_N13_D4_L3(padded):
    q, k, c, do = (_rand(2, 2, 13, 4, seed=s) for s in range(10, 14))
    v, p = _rand(2, 2, 13, 5, seed=14), _rand(2, 2, 3, 4, seed=15)
    do = _rand(2, 2, 13, 5, seed=16)
    kpm = _padding(2, 13) if padded else None
    want = _grads(lambda *a: naive_nested(*a, key_padding_mask=kpm), (q, k, v, p, c), do)
    got = _grads(lambda *a: nested_attention(*a, key_padding_mask=kpm), (q, k, v, p, c), do)
    for name, g, x in zip(("out", "dq", "dk", "dv", "dp", "dc"), got, want):
        assert_close(name, g, x, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("fm", list(FMS.values()), ids=list(FMS))
def test_scans_keep_padded_keys_out(fm, causal):
    """A NaN in a padded key reaches no output of the scans (a NaN in a later, unpadded key of the same chunk
    still can: the issue of the torch backend's dependence tests, not of its naive twin)."""
    w = draw_projection(fm, 4) if hasattr(fm, "features") else None
    q, k, v = (_rand(1, 1, 20, 4, seed=s) for s in (20, 21, 22))
    kpm = torch.zeros(1, 20, dtype=torch.bool)
    kpm[0, 12] = True
    k[0, 0, 12], v[0, 0, 12] = float("nan"), float("inf")
    assert torch.isfinite(linear_attention(q, k, v, fm, w, causal, kpm, chunk=4)).all()
    c = _rand(1, 1, 20, 4, seed=23)
    c[0, 0, 12] = float("nan")
    assert torch.isfinite(nested_attention(q, k, v, _rand(1, 1, 3, 4, seed=24), c, kpm)).all()
