"""Dependence is the contract, for the reference backend: a NaN or Inf in a key that an output must not depend
on (a key outside the mask, a future key of a causal stage, a padded key) changes neither that output nor any
gradient through it. Each case poisons one key and compares with a clean run, forward and backward: a padded
key is read by no row, so every output and every gradient must equal the clean run's; a masked key is read by
some rows, whose backward (even with a zero upstream gradient) legitimately meets it, so the checks are the
other rows' outputs and query gradients, and the gradients of keys no poisoned row reads."""
import pytest
import torch

from helpers import assert_close
from patterndsl.backends.reference.features import draw_projection
from patterndsl.backends.reference.linear import linear_attention
from patterndsl.backends.reference.nested import nested_attention
from patterndsl.backends.reference.softmax import softmax_attention
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.ir.program import Elu1, Favor, ReluFeatures

N, BAD = 24, 15          # the poisoned key; rows < BAD must not see it (causal), nor any row when padded
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(fn, inputs, rows):
    """The output and the gradients of every input for a loss over the output's `rows`."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    (out[:, :, rows] * torch.linspace(1, 2, out.shape[-1], dtype=out.dtype)).sum().backward()
    return [out.detach()] + [x.grad for x in leaves]


def _compare(fn, clean, poisoned, rows, checks):
    """`checks` maps a name (out, or an input's gradient) to the token positions that must equal the clean run's."""
    got, want = _run(fn, poisoned, rows), _run(fn, clean, rows)
    for (name, where), g, w in zip(checks.items(), got, want):
        assert_close(name, g[:, :, where], w[:, :, where], atol=1e-12)


def _poison(inputs, which, value, key=BAD):
    out = [x.clone() for x in inputs]
    for w in which:
        out[w][:, :, key] = value
    return out


def _padding():
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[:, BAD] = True
    kpm[1, :2] = True
    return kpm


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("case", ["causal", "padded", "sliding"])
def test_softmax(case, poison):
    q, k, v = (_rand(2, 2, N, 8, seed=s) for s in range(3))
    mask = M.sliding(3) if case == "sliding" else M.CAUSAL if case == "causal" else M.FULL
    kpm = _padding() if case == "padded" else None
    everything = slice(None)
    rows = everything if case == "padded" else slice(0, BAD - 3 if case == "sliding" else BAD)
    keys = everything if case == "padded" else [0, 1, 2, 3, 4, 5, 6, 7, 8, 22, 23] if case == "sliding" else []

    def fn(a, b, c):
        return softmax_attention(a, b, c, dense_mask(mask, N), 0.3, kpm)[0]
    _compare(fn, (q, k, v), _poison((q, k, v), (1, 2), POISONS[poison]), rows,
             {"out": rows, "dq": rows, "dk": keys, "dv": keys})


def test_softmax_query_rows_do_not_reach_keys_they_do_not_see():
    q, k, v = (_rand(1, 2, N, 8, seed=s) for s in range(3, 6))
    bad = _poison((q, k, v), (0,), float("nan"), key=3)

    def fn(a, b, c):
        return softmax_attention(a, b, c, dense_mask(M.CAUSAL, N), 0.3)[0]
    got = _run(fn, bad, slice(None))
    assert torch.isfinite(got[2][:, :, 4:]).all() and torch.isfinite(got[3][:, :, 4:]).all()   # dk, dv


FMS = {"favor": Favor(16), "relu": ReluFeatures(12), "elu1": Elu1()}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("case", ["causal", "causal-padded", "bidir-padded"])
@pytest.mark.parametrize("fm", list(FMS), ids=list(FMS))
def test_linear(fm, case, poison):
    feature_map = FMS[fm]
    w = draw_projection(feature_map, 8) if hasattr(feature_map, "features") else None
    q, k, v = (_rand(2, 2, N, 8, seed=s) for s in range(6, 9))
    kpm = _padding() if case.endswith("padded") else None
    rows = slice(None) if kpm is not None else slice(0, BAD)
    keys = slice(None) if kpm is not None else []

    def fn(a, b, c):
        return linear_attention(a, b, c, feature_map, w, causal=case.startswith("causal"), key_padding_mask=kpm)
    _compare(fn, (q, k, v), _poison((q, k, v), (1, 2), POISONS[poison]), rows,
             {"out": rows, "dq": rows, "dk": keys, "dv": keys})


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("case", ["future", "padded"])
def test_nested(case, poison):
    q, k, v, c = (_rand(2, 2, N, 4, seed=s) for s in range(9, 13))
    p = _rand(2, 2, 3, 4, seed=13)
    kpm = _padding() if case == "padded" else None
    rows = slice(None) if kpm is not None else slice(0, BAD)
    keys = slice(None) if kpm is not None else []

    def fn(a, b, c_, p_, pack):
        return nested_attention(a, b, c_, p_, pack, key_padding_mask=kpm)
    clean = (q, k, v, p, c)
    _compare(fn, clean, _poison(clean, (1, 2, 4), POISONS[poison]), rows,
             {"out": rows, "dq": rows, "dk": keys, "dv": keys, "dp": slice(None) if kpm is not None else [],
              "dc": keys})
