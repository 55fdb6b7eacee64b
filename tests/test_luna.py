"""Luna: the pack/unpack program, causal Luna and `LunaLayer` follow docs/language.md §5, written out here."""
import math

import pytest
import torch
import torch.nn.functional as F

import patterndsl as pd
from patterndsl import PatternError
from patterndsl.ir.program import INPUT
from patterndsl.nn.luna import LunaLayer, split_luna

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _luna_op(length):
    return pd.compile("luna", length=length, backend="reference")


def _causal_op(length):
    return pd.compile("luna_causal", length=length, backend="reference")


def _softmax_masked(s, kpm=None):
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1)


def _causal_equations(q, k, v, p, c):
    """Causal Luna token by token (no padding): a = softplus_ln2(c.p / sqrt(d)), 1/t averages."""
    B, H, N, D = q.shape
    out = torch.zeros_like(v)
    for t in range(N):
        a = F.softplus(c[:, :, :t + 1] @ p.transpose(-1, -2) / math.sqrt(D), beta=math.log(2))   # [B, H, t, l]
        s = (q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-1, -2)) / math.sqrt(D)               # [B, H, 1, t]
        attn = torch.softmax((s @ a) / (t + 1), dim=-1)                                       # [B, H, 1, l]
        out[:, :, t] = ((attn @ a.transpose(-1, -2)) @ v[:, :, :t + 1])[:, :, 0] / (t + 1)
    return out


# ----------------------------------------------------------------------------------------------- ops
def test_pack_unpack_program_B2_H2_N10_D4_L3():
    q, k, v = _rand(2, 2, 10, 4, seed=0), _rand(2, 2, 10, 4, seed=1), _rand(2, 2, 10, 4, seed=2)
    p = _rand(2, 3, 4, seed=3)                                         # [H, l, D]
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, -4:] = True
    out, packed = _luna_op(3)(q, k, v, key_padding_mask=kpm, p=p)
    want_packed = _softmax_masked(p[None] @ k.transpose(-1, -2) / 2, kpm) @ v
    want_out = torch.softmax(q @ want_packed.transpose(-1, -2) / 2, dim=-1) @ want_packed
    assert (packed - want_packed).abs().max() < 1e-12
    assert (out - want_out).abs().max() < 1e-12


def test_causal_program_B2_H2_N9_D4_L3():
    q, k, v, c = (_rand(2, 2, 9, 4, seed=s) for s in (4, 5, 6, 7))
    p = _rand(3, 4, seed=8)                                            # [l, D], shared by the heads
    got = _causal_op(3)(q, k, v, p=p, c=c)
    assert (got - _causal_equations(q, k, v, p.expand(2, 2, 3, 4), c)).abs().max() < 1e-12


def test_causal_program_does_not_read_the_future():
    q, k, v, c = (_rand(1, 2, 12, 4, seed=s) for s in (9, 10, 11, 12))
    p = _rand(2, 3, 4, seed=13)
    op = _causal_op(3)
    before = op(q, k, v, p=p, c=c)
    k2, v2, c2, q2 = k.clone(), v.clone(), c.clone(), q.clone()
    for t in (k2, v2, c2, q2):
        t[:, :, 7:] += 2.0
    after = op(q2, k2, v2, p=p, c=c2)
    assert (before[:, :, :7] - after[:, :, :7]).abs().max() <= 1e-12
    assert (before[:, :, 7:] - after[:, :, 7:]).abs().max() > 1e-3


def test_layer_runs_the_builtin_luna_stages():
    luna = pd.builtin("luna").lower(length=5)
    pack, unpack = split_luna(5)
    assert pack.stages == (luna.stage("packed"),) and pack.params == luna.params
    assert unpack.stages[0].mask == luna.stage("out").mask and unpack.stages[0].keys == INPUT
    layer = LunaLayer(8, 2, 5, causal=True, backend="reference")
    assert layer.causal_op.ir == pd.compile("luna_causal", length=5).ir


# ------------------------------------------------------------------------------------------- the layer
def _lin(mod, x):
    return F.linear(x, mod.weight, mod.bias)


def _heads(x, h):
    B, n, E = x.shape
    return x.view(B, n, h, E // h).transpose(1, 2)


def _merge(x):
    B, h, n, d = x.shape
    return x.transpose(1, 2).reshape(B, n, h * d)


def _ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _layer_equations(layer, x, P, kpm):
    """fairseq-apollo's LunaEncoderLayer with LunarMultiheadAttention (tied k = v), written out."""
    h, hp = layer.num_heads, layer.num_pheads
    pre = layer.normalize_before
    xn, pn = (_ln(layer.attn_norm, x), _ln(layer.p_norm, P)) if pre else (x, P)
    C = _heads(_lin(layer.pc_proj, xn), hp)
    PQ = _heads(_lin(layer.pq_proj, pn), hp) / math.sqrt(C.shape[-1])
    Yp = _merge(_softmax_masked(PQ @ C.transpose(-1, -2), kpm) @ C)
    K = _heads(_lin(layer.c_proj, Yp), h)
    Q = _heads(_lin(layer.q_proj, xn), h) / math.sqrt(K.shape[-1])
    Y = _lin(layer.out_proj, _merge(torch.softmax(Q @ K.transpose(-1, -2), -1) @ K))
    if pre:
        xa, p_new = x + Y, P + Yp
        return xa + _lin(layer.fc2, F.relu(_lin(layer.fc1, _ln(layer.ffn_norm, xa)))), p_new
    xa, p_new = _ln(layer.attn_norm, x + Y), _ln(layer.p_norm, P + Yp)
    return _ln(layer.ffn_norm, xa + _lin(layer.fc2, F.relu(_lin(layer.fc1, xa)))), p_new


@pytest.mark.parametrize("pre", [False, True], ids=["postLN", "preLN"])
@pytest.mark.parametrize("pheads", [4, 2], ids=["Hp4", "Hp2"])
def test_layer_matches_equations_B2_N11_E16_H4_L3(pre, pheads):
    torch.manual_seed(0)
    layer = LunaLayer(16, 4, 3, normalize_before=pre, num_pheads=pheads, backend="reference").double()
    x = _rand(2, 11, 16, seed=20)
    P = _rand(2, 3, 16, seed=21)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[0, -3:] = True
    got_x, got_p = layer(x, P, key_padding_mask=kpm)
    want_x, want_p = _layer_equations(layer, x, P, kpm)
    assert (got_x - want_x).abs().max() < 1e-12 and (got_p - want_p).abs().max() < 1e-12
    default_x, default_p = layer(x)                                  # the learned packed sequence
    assert (default_p - _layer_equations(layer, x, layer.packed.expand(2, 3, 16), None)[1]).abs().max() < 1e-12
    assert default_x.shape == (2, 11, 16)


def test_causal_layer_matches_equations_and_is_causal():
    torch.manual_seed(1)
    layer = LunaLayer(16, 4, 3, causal=True, backend="reference").double()
    x = _rand(2, 10, 16, seed=22)
    got, p_out = layer(x)
    P = layer.packed.expand(2, 3, 16)
    kv = _heads(_lin(layer.c_proj, x), 4)
    y = _causal_equations(_heads(_lin(layer.q_proj, x), 4), kv, kv, _heads(_lin(layer.pq_proj, P), 4),
                          _heads(_lin(layer.pc_proj, x), 4))
    xa = _ln(layer.attn_norm, x + _lin(layer.out_proj, _merge(y)))
    want = _ln(layer.ffn_norm, xa + _lin(layer.fc2, F.relu(_lin(layer.fc1, xa))))
    assert (got - want).abs().max() < 1e-12
    assert torch.equal(p_out, P)
    x2 = x.clone()
    x2[:, 6:] = _rand(2, 4, 16, seed=23)
    assert (layer(x2)[0][:, :6] - got[:, :6]).abs().max() <= 1e-12


def test_layer_gradients_reach_every_parameter():
    layer = LunaLayer(8, 2, 2, backend="reference")
    x, p = layer(torch.randn(2, 5, 8))
    (x.sum() + p.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in layer.parameters())


def test_layer_errors():
    with pytest.raises(PatternError, match="length must be an int >= 1, got 0"):
        LunaLayer(8, 2, 0)
    with pytest.raises(PatternError, match="unknown activation 'tanh'"):
        LunaLayer(8, 2, 2, activation="tanh")
    with pytest.raises(PatternError, match="embed_dim 8 is not divisible by num_heads 3"):
        LunaLayer(8, 2, 2, num_pheads=3)
    layer = LunaLayer(8, 2, 2, backend="reference")
    with pytest.raises(PatternError, match=r"p must be \(2, 2, 8\) or \(2, 8\), got \(3, 8\)"):
        layer(torch.randn(2, 5, 8), p=torch.randn(3, 8))
    with pytest.raises(PatternError, match=r"p must be .* got list"):
        layer(torch.randn(2, 5, 8), p=[1.0])
