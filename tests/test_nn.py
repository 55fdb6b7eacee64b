"""The nn layers: `Attention` (vs nn.MultiheadAttention, params, redraw), `LongformerAttention` (vs its
definition written out here), and their input errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import patterndsl as pd
from patterndsl import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.program import Elu1, Favor, Linear, ProgramIR, Softmax, Stage
from patterndsl.nn import Attention, LongformerAttention
from patterndsl.nn._common import make_op
from patterndsl.op import AttentionOp

F64 = torch.float64


def _prog(mask=M.FULL, norm=Softmax()):
    return ProgramIR("p", (Stage("out", norm, mask),), ("out",))


def _luna(length, causal=False):
    return pd.compile("luna_causal" if causal else "luna", length=length, backend="reference")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -------------------------------------------------------------------------------------------- Attention
def test_full_program_equals_multihead_attention_B2_N9_E16_H4():
    torch.manual_seed(0)
    ours = Attention(_prog(), 16, 4, backend="reference").double()
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    x = _rand(2, 9, 16, seed=1)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, -3:] = True
    want = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    assert (ours(x, key_padding_mask=kpm) - want).abs().max() < 1e-12


def test_sliding_program_equals_masked_multihead_attention():
    torch.manual_seed(1)
    ours = Attention(_prog(M.sliding(2)), 8, 2, bias=False, backend="reference").double()
    x = _rand(1, 7, 8, seed=2)
    q, k, v = (f.weight for f in (ours.q_proj, ours.k_proj, ours.v_proj))
    allowed = (torch.arange(7)[:, None] - torch.arange(7)[None]).abs() <= 2
    want = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 8, 2, None, None, None, None, False, 0.0,
        ours.out_proj.weight, ours.out_proj.bias, use_separate_proj_weight=True, q_proj_weight=q,
        k_proj_weight=k, v_proj_weight=v, attn_mask=~allowed, need_weights=False)[0].transpose(0, 1)
    assert (ours(x) - want).abs().max() < 1e-12


def test_luna_program_params_and_outputs():
    torch.manual_seed(2)
    layer = Attention(_luna(300), 64, 4, backend="reference")
    assert layer.q_proj is not None and layer.k_proj is not None and layer.c_proj is None
    p = layer.params["p"]
    assert p.shape == (4, 300, 16)
    assert abs(p.std().item() - 16 ** -0.5) < 0.01 and abs(p.mean().item()) < 0.01
    out, packed = layer(torch.randn(2, 10, 64))
    assert out.shape == (2, 10, 64) and packed.shape == (2, 300, 64)
    with pytest.raises(PatternError, match="'p' is computed by the layer, do not pass it"):
        layer(torch.randn(2, 10, 64), p=torch.randn(300, 16))


def test_causal_luna_program_projects_pack_keys():
    layer = Attention(_luna(3, causal=True), 8, 2, backend="reference").double()
    assert layer.c_proj is not None
    x = _rand(1, 6, 8, seed=3)
    out = layer(x)
    x2 = x.clone()
    x2[:, 4:] += 1
    assert (layer(x2)[:, :4] - out[:, :4]).abs().max() < 1e-12
    with pytest.raises(PatternError, match="'c' is computed by the layer"):
        layer(x, c=torch.randn(1, 2, 6, 4))


def test_runtime_inputs_pass_through():
    layer = Attention(_prog(M.Same("seg")), 8, 2, backend="reference")
    x = torch.randn(1, 6, 8)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = layer(x, seg=seg)
    x2 = x.clone()
    x2[:, 3:] += 1                                     # the other segment cannot reach the first
    assert torch.allclose(layer(x2, seg=seg)[:, :3], out[:, :3])


def test_program_by_name_with_parameters():
    layer = Attention("longformer", 16, 4, backend="reference", window=4, globals={0})
    assert layer.op.ir == pd.compile("longformer", window=4, globals={0}).ir
    assert layer(torch.randn(2, 9, 16)).shape == (2, 9, 16)
    performer = Attention("performer", 16, 4, backend="reference", features=8, redraw=3)
    assert performer.redraw_interval == 3


def test_per_head_program_needs_its_head_count():
    stages = (Stage("a", Softmax(), M.sliding(1), heads=(0, 2)), Stage("b", Linear(Elu1()), M.FULL, heads=(2, 4)))
    prog = ProgramIR("hybrid", stages, ("a", "b"), by_heads=True)
    assert Attention(prog, 16, 4, backend="reference")(torch.randn(1, 5, 16)).shape == (1, 5, 16)
    with pytest.raises(PatternError, match="program hybrid splits 4 heads, but the layer has num_heads = 2"):
        Attention(prog, 16, 2)


def test_feature_redraw_every_k_training_calls():
    layer = Attention(_prog(norm=Linear(Favor(8, redraw=2))), 8, 2, backend="reference")
    assert layer.redraw_interval == 2
    x = torch.randn(1, 5, 8)
    outs = [layer(x) for _ in range(5)]                # training: draws 0, 0, 1, 1, 2
    assert layer.op._draws == {"out": 2}
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    layer.eval()
    for _ in range(4):
        layer(x)
    assert layer.op._draws == {"out": 2}
    fixed = Attention(_prog(norm=Linear(Favor(8))), 8, 2, backend="reference")
    for _ in range(3):
        fixed(x)
    assert fixed.redraw_interval == 0 and fixed.op._draws == {}


def test_dropout_only_in_training():
    layer = Attention(_prog(), 8, 2, dropout=0.5, backend="reference")
    x = torch.randn(2, 6, 8)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def _layer():
    return Attention(_prog(), 8, 2, backend="reference")


LAYER_ERRORS = {  # id: (call, message)
    "heads-do-not-divide": (lambda: Attention(_prog(), 10, 4), "embed_dim 10 is not divisible by num_heads 4"),
    "heads-0": (lambda: Attention(_prog(), 8, 0), "num_heads must be an int >= 1, got 0"),
    "x-list": (lambda: _layer()([1.0]), r"x must be a torch.Tensor \(B, N, 8\), got list"),
    "x-width": (lambda: _layer()(torch.randn(2, 5, 6)),
                r"x must be \(B, N, 8\) \(batch, tokens, embed_dim\), got \(2, 5, 6\)"),
    "padding-dtype": (lambda: _layer()(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 5, dtype=torch.long)),
                      r"key_padding_mask must be a bool tensor \[B, N_k\], got torch.int64"),
    "x-dtype": (lambda: _layer()(torch.randn(2, 5, 8, dtype=torch.float64)),
                r"x must have the layer's dtype torch.float32, got torch.float64"),
    **{f"dropout-{bad!r}": (lambda bad=bad: Attention(_prog(), 8, 2, dropout=bad),
                            r"dropout must be a probability in \[0, 1\), got") for bad in (2.0, -0.1, True, "0.1")},
    "params-on-ir": (lambda: make_op(_prog(), window=4), "parameters window cannot be applied to an IR program"),
    "params-on-op": (lambda: make_op(AttentionOp(None, _prog(), backend="reference"), window=4),
                     "parameters window cannot be applied to a compiled op"),
}


@pytest.mark.parametrize("case", list(LAYER_ERRORS))
def test_layer_errors(case):
    call, message = LAYER_ERRORS[case]
    with pytest.raises(PatternError, match=message):
        call()


def test_make_op_returns_a_compiled_op_as_is():
    op = AttentionOp(None, _prog(), backend="reference")
    assert make_op(op) is op


# ----------------------------------------------------------------------------------- LongformerAttention
def _longformer_definition(layer, x, kpm, glob, w, d):
    """Dense: non-global rows see |i-j| <= w*d on the dilation grid plus the global keys (local
    projections); global rows see every key (global projections); padding ignored, padded rows 0."""
    B, N, _ = x.shape
    h, hd = layer.num_heads, layer.head_dim
    split = lambda t: t.view(B, N, h, hd).transpose(1, 2)  # noqa: E731
    q, k, v = (split(F.linear(x, m.weight, m.bias)) for m in (layer.query, layer.key, layer.value))
    qg, kg, vg = (split(F.linear(x, m.weight, m.bias)) for m in
                  (layer.query_global, layer.key_global, layer.value_global))
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    band = ((i - j).abs() <= w * d) & ((i - j) % d == 0)
    out = torch.zeros(B, h, N, hd, dtype=x.dtype)
    for b in range(B):
        allowed = (band | glob[b][None, :]) & ~kpm[b][None, :]
        s = (q[b] @ k[b].transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
        out[b] = torch.softmax(s, -1) @ v[b]
        sg = (qg[b] @ kg[b].transpose(-1, -2) / math.sqrt(hd)).masked_fill(kpm[b][None, None, :], float("-inf"))
        out[b][:, glob[b]] = (torch.softmax(sg, -1) @ vg[b])[:, glob[b]]
        out[b][:, kpm[b]] = 0
    out = out.transpose(1, 2).reshape(B, N, h * hd)
    return F.linear(out, layer.out_proj.weight, layer.out_proj.bias)


@pytest.mark.parametrize("window,dilation", [(4, 1), (2, 2), (6, 3)], ids=["W4-d1", "W2-d2", "W6-d3"])
def test_longformer_attention_B3_N14_E16_H2(window, dilation):
    torch.manual_seed(3)
    layer = LongformerAttention(16, 2, window, dilation=dilation, backend="reference").double()
    x = _rand(3, 14, 16, seed=4)
    kpm = torch.zeros(3, 14, dtype=torch.bool)
    kpm[1, -4:] = True
    glob = torch.zeros(3, 14, dtype=torch.bool)
    glob[0, [0, 7]] = glob[1, 2] = True
    got = layer(x, key_padding_mask=kpm, global_mask=glob)
    assert (got - _longformer_definition(layer, x, kpm, glob, window // 2, dilation)).abs().max() < 1e-12
    none = torch.zeros_like(glob)
    assert (layer(x) - _longformer_definition(layer, x, none, none, window // 2, dilation)).abs().max() < 1e-12


LONGFORMER_ERRORS = {  # id: (call, message)
    "window-negative": (lambda: LongformerAttention(8, 2, -2), "window must be an int >= 0, got -2"),
    "dilation-0": (lambda: LongformerAttention(8, 2, 4, dilation=0), "dilation must be an int >= 1, got 0"),
    "global-mask-shape": (lambda: LongformerAttention(8, 2, 4, backend="reference")(
        torch.randn(1, 5, 8), global_mask=torch.zeros(1, 4, dtype=torch.bool)),
        r"global_mask must be \[1, 5\] \(batch, keys\), got \[1, 4\]"),
}


@pytest.mark.parametrize("case", list(LONGFORMER_ERRORS))
def test_longformer_attention_errors(case):
    call, message = LONGFORMER_ERRORS[case]
    with pytest.raises(PatternError, match=message):
        call()
