"""Reference linear attention: projections, feature maps, and outputs vs the definitions written out here (the
torch backend's chunked scans are checked against this reference in test_torch_scans.py)."""
import math

import pytest
import torch

from helpers import assert_close
from patterndsl.backends.reference import linear as L
from patterndsl.backends.reference.features import (draw_projection, elu1_features, favor_features,
                                                    relu_features)
from patterndsl.ir.program import Elu1, Favor, ReluFeatures

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --------------------------------------------------------------- the definitions, written independently
def _phi_q(x, fm, w):
    d = x.shape[-1]
    if isinstance(fm, Elu1):
        return torch.where(x > 0, x + 1, torch.exp(x))
    xs = x / d ** 0.25
    u = xs @ w.T
    if isinstance(fm, ReluFeatures):
        return u.clamp(min=0) + 1e-3
    m = w.shape[0]
    return (torch.exp(u - (xs ** 2).sum(-1, keepdim=True) / 2 - u.max(-1, keepdim=True).values) + fm.eps) / math.sqrt(m)


def _phi_keys(ks, fm, w):
    """Features of a set of keys [n, d] with the key stabiliser taken over exactly this set."""
    if not isinstance(fm, Favor):
        return _phi_q(ks, fm, w)
    d, m = ks.shape[-1], w.shape[0]
    xs = ks / d ** 0.25
    u = xs @ w.T
    return (torch.exp(u - (xs ** 2).sum(-1, keepdim=True) / 2 - u.max()) + fm.eps) / math.sqrt(m)


def _definition(q, k, v, fm, w, causal, kpm):
    """Row by row: query t against the unpadded keys it may see (j <= t when causal)."""
    B, H, n_q, _ = q.shape
    out = torch.zeros(B, H, n_q, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(n_q):
                js = [j for j in range(k.shape[2]) if not kpm[b, j] and (not causal or j <= t)]
                if not js:
                    continue
                fk = _phi_keys(k[b, h, js], fm, w)
                a = fk @ _phi_q(q[b, h, t], fm, w)
                out[b, h, t] = (a[:, None] * v[b, h, js]).sum(0) / a.sum()
    return out


FMS = {"favor": Favor(16), "favor-iid": Favor(12, orthogonal=False, scaling=1), "relu": ReluFeatures(16),
       "elu1": Elu1()}


def _proj(fm, d):
    return draw_projection(fm, d) if hasattr(fm, "features") else None


def _padding(B, N):
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[0, :3] = True                      # leading
    kpm[-1, N // 2:N // 2 + 4] = True      # middle
    kpm[-1, -2:] = True                    # trailing
    return kpm


# ------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("fm", list(FMS.values()), ids=list(FMS))
def test_matches_definition_B2_H2_N70_D8(fm, causal):
    B, H, N, D = 2, 2, 70, 8
    q, k, v = _rand(B, H, N, D, seed=1), _rand(B, H, N, D, seed=2), _rand(B, H, N, 5, seed=3)
    kpm = _padding(B, N)
    w = _proj(fm, D)
    got = L.linear_attention(q, k, v, fm, w, causal=causal, key_padding_mask=kpm)
    want = _definition(q, k, v, fm, w, causal, kpm)
    assert_close("out", got, want, atol=1e-12)
    assert got.dtype == F64


@pytest.mark.parametrize("n_q,n_k", [(9, 6), (6, 9)], ids=["Nq9-Nk6", "Nq6-Nk9"])
def test_causal_different_lengths(n_q, n_k):
    fm = Favor(8)
    q, k, v = _rand(1, 2, n_q, 4, seed=4), _rand(1, 2, n_k, 4, seed=5), _rand(1, 2, n_k, 4, seed=6)
    w = _proj(fm, 4)
    got = L.linear_attention(q, k, v, fm, w, causal=True)
    want = _definition(q, k, v, fm, w, True, torch.zeros(1, n_k, dtype=torch.bool))
    assert_close("out", got, want, atol=1e-12)


@pytest.mark.parametrize("fm", [FMS["favor"], FMS["relu"]], ids=["favor", "relu"])
def test_causal_does_not_read_the_future_B2_H2_N150_D8(fm):
    B, H, N, D, t0 = 2, 2, 150, 8, 77
    q, k, v = _rand(B, H, N, D, seed=7), _rand(B, H, N, D, seed=8), _rand(B, H, N, D, seed=9)
    w = _proj(fm, D)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t0:] = 5 * _rand(B, H, N - t0, D, seed=10)       # larger keys: the running max moves
    v2[:, :, t0:] += 3
    before = L.linear_attention(q, k, v, fm, w, causal=True)
    after = L.linear_attention(q, k2, v2, fm, w, causal=True)
    assert_close("rows before t0", before[:, :, :t0], after[:, :, :t0], atol=1e-12)
    assert (before[:, :, t0:] - after[:, :, t0:]).abs().max() > 1e-3


def test_causal_last_row_is_bidirectional():
    fm = Favor(16)
    q, k, v = _rand(2, 2, 100, 8, seed=11), _rand(2, 2, 100, 8, seed=12), _rand(2, 2, 100, 8, seed=13)
    kpm = _padding(2, 100)
    w = _proj(fm, 8)
    causal = L.linear_attention(q, k, v, fm, w, causal=True, key_padding_mask=kpm)
    bidir = L.linear_attention(q, k, v, fm, w, causal=False, key_padding_mask=kpm)
    assert_close("last row", causal[:, :, -1], bidir[:, :, -1], atol=1e-13)


def test_large_inputs_do_not_overflow_fp32():
    """Keys far larger than the first ones: the running max rescales the state instead of overflowing."""
    fm = Favor(32)
    q, k, v = (_rand(1, 1, 80, 16, seed=s, dtype=torch.float32) for s in (14, 15, 16))
    k = k * torch.linspace(0.1, 12, 80)[None, None, :, None]
    w = _proj(fm, 16).float()
    out = L.linear_attention(q, k, v, fm, w, causal=True)
    want = L.linear_attention(q.double(), k.double(), v.double(), fm, w.double(), causal=True)
    assert torch.isfinite(out).all()
    assert_close("out", out, want, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_all_keys_padded_give_zeros_and_finite_grads(causal):
    fm = Favor(8)
    q, k, v = (_rand(1, 2, 6, 4, seed=s).requires_grad_() for s in (17, 18, 19))
    kpm = torch.ones(1, 6, dtype=torch.bool)
    out = L.linear_attention(q, k, v, fm, _proj(fm, 4), causal=causal, key_padding_mask=kpm)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_low_precision_B1_H2_N40_D8(dtype, tol, causal):
    fm = Favor(16)
    q, k, v = (_rand(1, 2, 40, 8, seed=s) for s in (20, 21, 22))
    w = _proj(fm, 8)
    gold = L.linear_attention(q, k, v, fm, w, causal=causal)
    out = L.linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), fm, w.float(), causal=causal)
    assert out.dtype == dtype
    assert_close("out", out, gold, atol=tol)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("fm", [FMS["favor"], FMS["elu1"]], ids=["favor", "elu1"])
def test_gradcheck_B1_H2_N9_D4(fm, causal):
    q, k, v = (_rand(1, 2, 9, 4, seed=s).requires_grad_() for s in (23, 24, 25))
    kpm = torch.zeros(1, 9, dtype=torch.bool)
    kpm[0, 2] = True
    w = _proj(fm, 4)
    assert torch.autograd.gradcheck(
        lambda a, b, c: L.linear_attention(a, b, c, fm, w, causal=causal, key_padding_mask=kpm), (q, k, v))


# ------------------------------------------------------------------------------- projections, features
@pytest.mark.parametrize("m,d", [(8, 4), (10, 4), (3, 8)], ids=["m8-d4", "m10-d4", "m3-d8"])
def test_orthogonal_projection_blocks(m, d):
    w = draw_projection(Favor(m, scaling=1), d)
    assert w.shape == (m, d) and w.dtype == F64
    assert torch.allclose(w.norm(dim=1), torch.full((m,), math.sqrt(d), dtype=F64))
    for s in range(0, m, d):
        block = w[s:s + d] / math.sqrt(d)
        assert torch.allclose(block @ block.T, torch.eye(block.shape[0], dtype=F64), atol=1e-12)


def test_projection_chi_norms_reproducible_and_redrawn():
    fm = Favor(4096, seed=3)
    w = draw_projection(fm, 16)
    assert torch.equal(w, draw_projection(fm, 16))
    assert not torch.equal(w, draw_projection(fm, 16, draw=1))
    assert not torch.equal(w, draw_projection(Favor(4096, seed=4), 16))
    norms2 = w.norm(dim=1) ** 2                  # chi-squared with d = 16 degrees of freedom
    assert abs(norms2.mean().item() - 16) < 0.5 and abs(norms2.var().item() - 32) < 4


def test_iid_projection_and_relu_map():
    w = draw_projection(ReluFeatures(6, orthogonal=False), 4)
    assert w.shape == (6, 4)
    assert torch.equal(w, draw_projection(ReluFeatures(6, orthogonal=False), 4))


def test_feature_maps_match_formulas_B2_H2_N5_D4():
    x = _rand(2, 2, 5, 4, seed=26)
    fm = Favor(8, eps=1e-3)
    w = _proj(fm, 4)
    assert (favor_features(x, w, True, fm.eps) - _phi_q(x, fm, w)).abs().max() < 1e-14
    keys = favor_features(x, w, False, fm.eps)
    for b in range(2):
        for h in range(2):
            assert (keys[b, h] - _phi_keys(x[b, h], fm, w)).abs().max() < 1e-14
    assert (relu_features(x, w) - _phi_q(x, ReluFeatures(8), w)).abs().max() < 1e-15
    assert (elu1_features(x) - _phi_q(x, Elu1(), None)).abs().max() < 1e-15


def test_padded_keys_leave_the_key_max():
    x = _rand(1, 1, 6, 4, seed=27)
    fm = Favor(8)
    w = _proj(fm, 4)
    valid = torch.tensor([[True, True, True, True, False, False]])
    padded = favor_features(x, w, False, fm.eps, valid=valid)
    assert torch.equal(padded[0, 0, 4:], torch.zeros(2, 8, dtype=F64))
    assert (padded[0, 0, :4] - _phi_keys(x[0, 0, :4], fm, w)).abs().max() < 1e-14
