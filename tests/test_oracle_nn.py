"""`pd.nn.Attention` against an oracle layer built from its own weights in plain torch: projections, the
oracle attention (tests/oracles.py), dropout on the merged attention output, then `out_proj`. With dropout p
and a fixed seed the layer's training output equals the oracle's, which fails wherever the dropout sits
elsewhere (after `out_proj`, on the input, or not at all)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import oracles as O
import patterndsl as pd
from helpers import assert_close

E, H, N, B = 32, 4, 12, 2
DH = E // H


def _split(x):
    return x.view(B, N, H, DH).transpose(1, 2)


def _merge(x):
    return x.transpose(1, 2).reshape(B, -1, E)


def _softmax_layer(mask):
    def attend(layer, q, k, v, kpm):
        return O.softmax_attention(q, k, v, mask, DH ** -0.5, kpm)
    return attend


def _favor_layer(layer, q, k, v, kpm):
    w = layer.op.projection(layer.op.ir.stages[0], DH, q.device, q.dtype)   # the layer's random features
    return O.linear_attention(q, k, v, torch.ones(N, N, dtype=torch.bool), "favor", w, key_padding_mask=kpm)


def _luna_layer(layer, q, k, v, kpm):
    out, _ = O.luna(q, k, v, layer.params["p"].to(q.dtype), kpm, DH ** -0.5, DH ** -0.5)
    return out


CASES = {
    "longformer-w4": (("longformer", dict(window=4, globals={0})), None),
    "sliding_window-3": (("sliding_window", dict(window=3)), None),
    "performer-m8": (("performer", dict(features=8)), _favor_layer),
    "luna-l3": (("luna", dict(length=3)), _luna_layer),
}


def _oracle(layer, attend, x, kpm, p, seed):
    q, k, v = (_split(proj(x)) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    y = _merge(attend(layer, q, k, v, kpm))
    torch.manual_seed(seed)
    return layer.out_proj(F.dropout(y, p, training=layer.training))


@pytest.mark.parametrize("p", [0.0, 0.5], ids=["p0", "p0.5"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_layer_equals_the_oracle_layer_with_dropout_before_out_proj(case, p):
    (name, params), attend = case
    torch.manual_seed(0)
    layer = pd.nn.Attention(name, E, H, dropout=p, backend="reference", **params).double().train()
    x = torch.randn(B, N, E, dtype=torch.float64)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1, -2:] = True
    if attend is None:
        attend = _softmax_layer(layer.op.mask(N, N))
    torch.manual_seed(123)
    got = layer(x, key_padding_mask=kpm)
    got = got[0] if isinstance(got, tuple) else got
    want = _oracle(layer, attend, x, kpm, p, 123)
    assert_close("layer output", got, want, atol=1e-10, rtol=1e-10)
    layer.eval()
    got = layer(x, key_padding_mask=kpm)
    assert_close("eval output (no dropout)", got[0] if isinstance(got, tuple) else got,
                 _oracle(layer, attend, x, kpm, p, 0), atol=1e-10, rtol=1e-10)
