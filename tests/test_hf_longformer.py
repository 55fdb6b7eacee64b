"""`longformer_from_hf` reproduces transformers' `LongformerSelfAttention` (random weights, no download)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

from patterndsl import PatternError  # noqa: E402
from patterndsl.integrations.hf import longformer_from_hf  # noqa: E402

E, HEADS = 32, 4


def _hf(window: int) -> LongformerSelfAttention:
    torch.manual_seed(window)
    cfg = transformers.LongformerConfig(hidden_size=E, num_attention_heads=HEADS, attention_window=[window])
    mod = LongformerSelfAttention(cfg, layer_id=0).eval()
    with torch.no_grad():                                      # biases away from zero, global != local
        for p in mod.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mod


def _hf_forward(mod, x, attention_mask, global_attention_mask):
    """What `LongformerModel` hands its layers: the merged mask, -inf-ish / 0 / +inf-ish."""
    merged = attention_mask * (global_attention_mask + 1)
    ext = torch.zeros(merged.shape, dtype=x.dtype)
    ext[merged == 0] = torch.finfo(x.dtype).min
    ext[merged == 2] = torch.finfo(x.dtype).max
    with torch.no_grad():
        return mod(x, attention_mask=ext, is_index_masked=ext < 0, is_index_global_attn=ext > 0,
                   is_global_attn=bool((ext > 0).any()))[0]


def _masks(B, N, globals_per_row, pad_per_row):
    am = torch.ones(B, N, dtype=torch.long)
    gm = torch.zeros(B, N, dtype=torch.long)
    for b, (gs, pad) in enumerate(zip(globals_per_row, pad_per_row)):
        if pad:
            am[b, N - pad:] = 0
        gm[b, list(gs)] = 1
    return am, gm


CASES = {
    "W4-N16-mixed-globals": (4, 16, [[0], [1, 5], [0, 2, 9]], [0, 3, 1]),
    "W6-N24-no-globals": (6, 24, [[], [], []], [0, 5, 0]),
    "W8-N32-many-globals": (8, 32, [[0, 1, 2, 3, 31], [7], []], [0, 0, 6]),
    "W16-N32-one-row-global": (16, 32, [[], [15], []], [2, 0, 0]),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_transformers_fp32(case):
    window, N, globs, pads = case
    mod = _hf(window)
    x = torch.randn(len(globs), N, E, generator=torch.Generator().manual_seed(N))
    am, gm = _masks(len(globs), N, globs, pads)
    ours = longformer_from_hf(mod, backend="reference")
    with torch.no_grad():
        got = ours(x, attention_mask=am, global_attention_mask=gm)
    assert (got - _hf_forward(mod, x, am, gm)).abs().max() <= 1e-5


def test_any_length_equals_transformers_on_the_padded_input():
    """transformers needs N % attention_window == 0 (LongformerModel pads); we take N = 13 as it is."""
    mod = _hf(4)
    x = torch.randn(2, 13, E, generator=torch.Generator().manual_seed(1))
    am, gm = _masks(2, 13, [[0], [3, 12]], [0, 2])
    padded_x = torch.cat([x, torch.randn(2, 3, E)], dim=1)
    padded_am = torch.cat([am, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded_gm = torch.cat([gm, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    want = _hf_forward(mod, padded_x, padded_am, padded_gm)[:, :13]
    with torch.no_grad():
        got = longformer_from_hf(mod, backend="reference")(x, am, gm)
    assert (got - want).abs().max() <= 1e-5


def test_defaults_and_global_on_padding_ignored():
    mod = _hf(4)
    x = torch.randn(1, 8, E, generator=torch.Generator().manual_seed(2))
    ours = longformer_from_hf(mod, backend="reference")
    ones = torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        assert (ours(x) - _hf_forward(mod, x, ones, torch.zeros_like(ones))).abs().max() <= 1e-5
        am = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
        gm = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 1]])              # the global mark on a pad is dropped
        got = ours(x, attention_mask=am.bool(), global_attention_mask=gm)
        assert (got - _hf_forward(mod, x, am, gm)).abs().max() <= 1e-5
        assert torch.equal(got[0, 6:], torch.zeros(2, E))


def test_gradients_flow_through_the_copy():
    ours = longformer_from_hf(_hf(4), backend="reference")
    x = torch.randn(2, 8, E, requires_grad=True)
    ours(x, global_attention_mask=torch.tensor([[1] + [0] * 7, [0] * 8])).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert ours.attention.query_global.weight.grad is not None


def test_errors():
    with pytest.raises(PatternError, match="expected a transformers LongformerSelfAttention, got Linear"):
        longformer_from_hf(torch.nn.Linear(2, 2))
    ours = longformer_from_hf(_hf(4), backend="reference")
    x = torch.randn(1, 8, E)
    with pytest.raises(PatternError, match=r"attention_mask must be a 0/1 tensor \(1, 8\), got \(1, 7\)"):
        ours(x, attention_mask=torch.ones(1, 7))
    with pytest.raises(PatternError, match=r"global_attention_mask must be a 0/1 tensor \(1, 8\), got list"):
        ours(x, global_attention_mask=[0] * 8)
    with pytest.raises(PatternError, match="attention_mask must hold only 0 and 1"):
        ours(x, attention_mask=torch.full((1, 8), -10000.0))


def test_inside_a_longformer_model_the_outputs_are_transformers():
    """Every layer's attention replaced by ours: LongformerModel's outputs are unchanged (padding to the window,
    global tokens, padded rows), and asking for attention probabilities is refused."""
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(vocab_size=50, hidden_size=E, num_attention_heads=HEADS, num_hidden_layers=2,
                                        intermediate_size=64, attention_window=[4, 8], max_position_embeddings=64,
                                        pad_token_id=1)
    base = transformers.LongformerModel(cfg, add_pooling_layer=False).eval()
    ours = copy.deepcopy(base)
    for layer in ours.encoder.layer:
        layer.attention.self = longformer_from_hf(layer.attention.self, backend="torch")
    ids = torch.randint(2, 50, (2, 13), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, -4:] = 0
    gm = torch.zeros_like(ids)
    gm[0, 0] = gm[1, [2, 7]] = 1
    with torch.no_grad():
        got = ours(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
        want = base(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    assert (got - want).abs().max() <= 1e-5
    with pytest.raises(PatternError, match="patterndsl's Longformer layer cannot return attention probabilities"):
        ours(ids, attention_mask=am, output_attentions=True)
