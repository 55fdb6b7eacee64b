"""Patterns inside transformers models (`patterndsl.integrations.hf.apply`), on tiny random configs, offline: a
pattern equal to the model's own attention gives transformers' SDPA logits (fp32, 1e-5) with grouped kv heads,
padding and caches; greedy `generate()` with the cache gives the tokens it gives without and with SDPA; a
decode step of a window sees the right keys; per-layer patterns; a local+global pattern trains; the checks."""
import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import patterndsl as pd  # noqa: E402
from patterndsl import PatternError  # noqa: E402
from patterndsl.integrations import hf  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _model(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, **extra))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=5, **extra))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, **extra))
    else:
        cfg = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
        model = transformers.BertModel(transformers.BertConfig(**cfg, **extra), add_pooling_layer=False)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _pair(kind, pattern, **params):
    """(the model on SDPA, a copy on the pattern)."""
    base = _model(kind)
    return base, hf.apply(copy.deepcopy(base), pattern, backend="torch", **params)


def _ids(B=2, N=14, seed=0):
    return torch.randint(0, SMALL["vocab_size"], (B, N), generator=torch.Generator().manual_seed(seed))


def _close(got, want, tol=1e-5):
    err = (got - want).abs().max().item()
    assert err <= tol, f"max error {err:.3g}"


CASES = {"llama-gqa-causal": ("llama", "causal", {}), "mistral-window": ("mistral", "sliding_window", dict(window=5)),
         "qwen2-causal": ("qwen2", "causal", {})}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_own_attention_gives_sdpa_logits(case):
    kind, pattern, params = CASES[case]
    base, ours = _pair(kind, pattern, **params)
    ids = _ids(N=14)
    am = torch.ones_like(ids)
    am[1, :3] = 0                                         # left padding in row 1
    with torch.no_grad():
        _close(ours(ids).logits, base(ids).logits)
        got, want = ours(ids, attention_mask=am).logits, base(ids, attention_mask=am).logits
    _close(got[0], want[0])
    _close(got[1, 3:], want[1, 3:])                       # the padded positions' outputs are not defined


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_greedy_generate_with_the_cache(case):
    kind, pattern, params = CASES[case]
    base, ours = _pair(kind, pattern, **params)
    ids = _ids(B=2, N=6, seed=1)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=am)
    with torch.no_grad():
        cached = ours.generate(ids, use_cache=True, **kw)
        uncached = ours.generate(ids, use_cache=False, **kw)
        sdpa = base.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, uncached) and torch.equal(cached, sdpa)


def test_a_decode_step_of_a_window_sees_the_right_keys():
    """Llama keeps every key in its cache; the window is the pattern's, evaluated at the step's position."""
    model = hf.apply(_model("llama"), "sliding_window", backend="torch", window=4)
    ids = _ids(B=1, N=10, seed=2)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
    _close(step, full)


def test_bert_padding_is_not_dropped():
    base, ours = _pair("bert", "full")
    ids = _ids(B=2, N=11, seed=3)
    am = torch.ones_like(ids)
    am[0, -4:] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=am).last_hidden_state
        want = base(ids, attention_mask=am).last_hidden_state
    _close(got[0, :-4], want[0, :-4])
    _close(got[1], want[1])


def test_per_layer_patterns_and_layers_left_to_the_model():
    base = _model("llama")
    mixed = hf.apply(copy.deepcopy(base), {0: ("sliding_window", {"window": 3}), 1: "causal"}, backend="torch")
    half = hf.apply(copy.deepcopy(base), {1: "causal"}, backend="torch")
    modules = hf.attention_modules(mixed)
    assert [m.patterndsl_op.name for m in modules.values()] == ["sliding_window", "causal"]
    assert hf.attention_modules(half)[0].patterndsl_op is None
    ids = _ids(B=1, N=12, seed=4)
    with torch.no_grad():
        _close(half(ids).logits, base(ids).logits)        # layer 0 runs the model's own mask through SDPA
        local = mixed(ids).logits
    assert (local - base(ids).logits).abs().max() > 1e-3  # the window changes layer 0


def test_a_local_and_global_pattern_trains():
    model = hf.apply(_model("llama"), "longformer", backend="torch", window=4, globals={0}, causal=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = _ids(B=2, N=16, seed=5)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def _raises(msg, fn, *args, **kw):
    with pytest.raises(PatternError, match=re.escape(msg)) as e:
        fn(*args, **kw)
    return e


def test_checks():
    _raises("found no attention module (with layer_idx and scaling) in Linear", hf.apply, torch.nn.Linear(2, 2),
            "causal")
    _raises("layers [7] are not attention layers of LlamaForCausalLM", hf.apply, _model("llama"), {7: "causal"})
    bert = hf.apply(_model("bert"), "full").train()
    e = _raises("patterndsl attention has no attention-probability dropout (its ops never form the probabilities), "
                "but BertSelfAttention asks for 0.1", bert, _ids(B=1, N=5))
    assert "config.attention_probs_dropout_prob" in str(e.value)
    llama = hf.apply(_model("llama"), "causal")
    _raises("patterndsl attention cannot return attention probabilities", llama, _ids(B=1, N=5),
            output_attentions=True)


def test_a_sliding_cache_cannot_serve_a_pattern_that_needs_dropped_keys():
    """Mistral's cache keeps the last window - 1 keys; a global token 0 would need key 0 later on."""
    model = hf.apply(_model("mistral"), "longformer", backend="torch", window=4, globals={0}, causal=True)
    with pytest.raises(PatternError, match="pattern longformer may still attend to position 0, but the cache kept "
                                           "only the keys from position") as e:
        model.generate(_ids(B=1, N=6), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert "DynamicCache() without a config" in str(e.value)
    from transformers import DynamicCache
    out = model.generate(_ids(B=1, N=6), max_new_tokens=8, do_sample=False, pad_token_id=0, cache=DynamicCache())
    assert out.shape == (1, 14)


def test_the_models_scaling_and_grouped_heads_reach_the_op():
    """The attention function alone, as a model calls it: scaling 0.3 (not 1/sqrt(d)), 2 kv heads, a cache of
    9 keys with 3 new queries, padding: SDPA with the same scale, repeated heads and the sliced causal mask."""
    from patterndsl.integrations.hf.attention import pattern_attention, pattern_mask

    class Module(torch.nn.Module):
        is_causal = True
        patterndsl_op = pd.compile("causal", backend="torch")

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :2] = 0
    mask = pattern_mask(2, 3, 9, q_offset=6, kv_offset=0, attention_mask=am)
    got, weights = pattern_attention(Module(), q, k, v, mask, scaling=0.3)
    allowed = (torch.arange(6, 9)[:, None] >= torch.arange(9)[None, :]) & am.bool()[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=allowed, scale=0.3)
    assert weights is None and got.shape == (2, 3, 4, 8)
    _close(got, want.transpose(1, 2))
