"""transformers bridges: `apply` puts patterns into a model's attention (`attention.py`); `longformer_from_hf`
rebuilds a `LongformerSelfAttention` as a patterndsl layer (`longformer.py`).

>>> import torch, transformers, patterndsl as pd
>>> from patterndsl.integrations import hf
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                num_attention_heads=4, num_key_value_heads=2)
>>> model = hf.apply(transformers.LlamaForCausalLM(cfg).eval(), "sliding_window", window=8)
>>> model.config._attn_implementation
'patterndsl'
>>> model(torch.randint(0, 64, (1, 12))).logits.shape
torch.Size([1, 12, 64])
"""
from __future__ import annotations

from ...errors import PatternError
from .attention import NAME, PatternMask, pattern_attention, pattern_mask
from .longformer import HFLongformerSelfAttention, longformer_from_hf

__all__ = ["NAME", "HFLongformerSelfAttention", "PatternMask", "apply", "attention_modules", "longformer_from_hf",
           "register"]


def register() -> None:
    """Register the attention and mask functions with transformers under the name `patterndsl` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, pattern_attention)
    AttentionMaskInterface.register(NAME, pattern_mask)


def attention_modules(model) -> dict[int, object]:
    """The self-attention modules of a transformers model by layer index (modules with a `layer_idx` and a
    `scaling` that call transformers' attention interface; cross-attention modules are left out)."""
    found = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx is None or not hasattr(m, "scaling") or "Cross" in type(m).__name__:
            continue
        if getattr(m, "is_cross_attention", False):
            continue
        found.setdefault(int(idx), m)
    return dict(sorted(found.items()))


def apply(model, pattern, backend: str = "auto", **params):
    """Run `model`'s self-attention through patterndsl ops and return the model (changed in place).

    `pattern`: a built-in name, `.attn` text or path, a `Program` or an op, with `params` overriding the
    pattern's parameters; or a dict `{layer index: pattern}` (layers left out keep the model's own attention)
    whose values may also be `(pattern, {parameters})` pairs; `params` then apply to every layer's pattern.
    The model's `scaling` multiplies the queries (relative to 1/sqrt(head_dim)); its padding mask is the ops'
    `key_padding_mask`; its cache position is the ops' `q_offset` (transformers' caches hold keys from position
    0, or, in sliding-window layers, the last ones: see `attention.py`). Attention dropout must be 0 in training
    (the ops never form probabilities); in eval transformers passes none.
    """
    from ...nn._common import make_op
    modules = attention_modules(model)
    if not modules:
        raise PatternError(f"found no attention module (with layer_idx and scaling) in {type(model).__name__}",
                           hint="apply works on models whose attention uses transformers' AttentionInterface")
    if isinstance(pattern, dict):
        unknown = sorted(set(pattern) - set(modules))
        if unknown:
            raise PatternError(f"layers {unknown} are not attention layers of {type(model).__name__}",
                               hint=f"its layers are 0 .. {max(modules)}")
        ops = {}
        for i, p in pattern.items():
            p, own = p if isinstance(p, tuple) else (p, {})
            ops[i] = make_op(p, backend, **{**params, **own})
    else:
        op = make_op(pattern, backend, **params)
        ops = {i: op for i in modules}
    for i, m in modules.items():
        m.patterndsl_op = ops.get(i)
    register()
    model.set_attn_implementation(NAME)
    return model
