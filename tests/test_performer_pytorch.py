"""FAVOR+ and relu features vs performer-pytorch's `FastAttention` with the same projection matrix.

performer-pytorch's causal path wants fast-transformers' CUDA `CausalDotProduct`; without it, it falls back
to `causal_linear_attention_noncuda` (prefix sums in Python). Its causal FAVOR+ also takes the key max over
the whole sequence, which reads the future; ours uses a running max, so causal outputs agree where the two
definitions coincide (relu features; the last row of FAVOR+) and ours alone is causal.
"""
import pytest
import torch

pp = pytest.importorskip("performer_pytorch.performer_pytorch")

import patterndsl as pd  # noqa: E402
from patterndsl.backends.reference.features import draw_projection, favor_features, relu_features  # noqa: E402
from patterndsl.backends.reference.linear import linear_attention  # noqa: E402
from patterndsl.ir.program import Favor, ReluFeatures  # noqa: E402

B, H, N, D, M = 2, 3, 40, 16, 32


def _qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g) for _ in range(3))


def _fast_attention(w, **kw):
    fa = pp.FastAttention(D, nb_features=M, **kw)
    fa.projection_matrix.copy_(w)
    return fa


def _op(causal, w, kernel="favor"):
    return pd.compile("performer", features=M, kernel=kernel, causal=causal, projection=w, backend="reference")


def test_favor_features_and_output_B2_H3_N40_D16_m32():
    q, k, v = _qkv(0)
    w = draw_projection(Favor(M), D).float()
    assert (favor_features(q, w, True) - pp.softmax_kernel(q, projection_matrix=w, is_query=True)).abs().max() < 1e-6
    assert (favor_features(k, w, False) - pp.softmax_kernel(k, projection_matrix=w, is_query=False)).abs().max() < 1e-6
    theirs = _fast_attention(w)(q, k, v)
    assert (linear_attention(q, k, v, Favor(M), w) - theirs).abs().max() < 1e-5
    assert (_op(False, w)(q, k, v) - theirs).abs().max() < 1e-5


def test_their_projection_in_our_op():
    """The other way round: performer-pytorch draws the matrix, we use it."""
    q, k, v = _qkv(1)
    fa = pp.FastAttention(D, nb_features=M)
    assert (_op(False, fa.projection_matrix.clone())(q, k, v) - fa(q, k, v)).abs().max() < 1e-5


def test_relu_features_and_output():
    q, k, v = _qkv(2)
    w = draw_projection(ReluFeatures(M), D).float()
    assert (relu_features(q, w) - pp.generalized_kernel(q, projection_matrix=w)).abs().max() < 1e-6
    theirs = _fast_attention(w, generalized_attention=True)(q, k, v)
    assert (linear_attention(q, k, v, ReluFeatures(M), w) - theirs).abs().max() < 1e-5
    assert (_op(False, w, kernel="relu")(q, k, v) - theirs).abs().max() < 1e-5


def test_causal_prefix_sums_agree_where_the_definitions_coincide():
    q, k, v = _qkv(3)
    w = draw_projection(Favor(M), D).float()
    # relu: no stabiliser, so their prefix sums (with their denominator eps set to 0) are ours
    fq, fk = (pp.generalized_kernel(t, projection_matrix=w) for t in (q, k))
    theirs = pp.causal_linear_attention_noncuda(fq, fk, v, eps=0.0)
    assert (linear_attention(q, k, v, ReluFeatures(M), w, causal=True) - theirs).abs().max() < 1e-5
    # FAVOR+: at the last row their global key max is our running max
    fq = pp.softmax_kernel(q, projection_matrix=w, is_query=True)
    fk = pp.softmax_kernel(k, projection_matrix=w, is_query=False)
    theirs = pp.causal_linear_attention_noncuda(fq, fk, v, eps=0.0)
    ours = linear_attention(q, k, v, Favor(M), w, causal=True)
    assert (ours[:, :, -1] - theirs[:, :, -1]).abs().max() < 1e-5


def test_causal_output_ignores_future_keys_theirs_does_not(capsys):
    q, k, v = _qkv(4)
    w = draw_projection(Favor(M), D).float()
    k2 = k.clone()
    k2[:, :, 30:] *= 4                                         # the future keys hold the global max
    op = _op(True, w)
    assert torch.equal(op(q, k, v)[:, :, :30], op(q, k2, v)[:, :, :30])
    fa = _fast_attention(w, causal=True)
    capsys.readouterr()                                        # its "unable to import cuda code" notice
    assert (fa(q, k, v)[:, :, :30] - fa(q, k2, v)[:, :, :30]).abs().max() > 1e-4
