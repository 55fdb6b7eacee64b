"""A patterndsl layer that reproduces transformers' `LongformerSelfAttention` with its weights, alone or inside a
`LongformerModel`.

>>> from transformers import LongformerConfig
>>> from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
>>> import torch
>>> hf = LongformerSelfAttention(LongformerConfig(hidden_size=16, num_attention_heads=2, attention_window=[4]), 0)
>>> layer = longformer_from_hf(hf, backend="reference")
>>> layer(torch.randn(1, 8, 16), global_attention_mask=torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]])).shape
torch.Size([1, 8, 16])

The masks are transformers' user-level ones, `(B, N)` of 0/1: `attention_mask` 1 = real token, 0 =
padding; `global_attention_mask` 1 = global token (ignored on padding, as `LongformerModel` merges them).
The computation runs through patterndsl ops (`nn.LongformerAttention`: the sliding window with runtime
per-row global tokens, and a full op for the global rows with the global projections), never through
transformers. transformers needs the length to be a multiple of `attention_window` and pads to it with
masked tokens in `LongformerModel`; this layer takes any length: padded keys are ignored, so its output on
the real tokens equals transformers' on the padded input. Attention-probability dropout is not reproduced
(the ops expose no probabilities): compare in eval mode.

Inside a `LongformerModel`, put it in place of each layer's attention
(`layer.attention.self = longformer_from_hf(layer.attention.self)`): called as the model calls its layers
(`is_index_masked`, `is_index_global_attn`, ...), it reads the padding and the global tokens from those and
returns the tuple the model expects.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import PatternError
from ...nn.longformer import LongformerAttention

_PAIRS = (("query", "query"), ("key", "key"), ("value", "value"), ("query_global", "query_global"),
          ("key_global", "key_global"), ("value_global", "value_global"))


class HFLongformerSelfAttention(nn.Module):
    """`layer(hidden_states (B, N, E), attention_mask=None, global_attention_mask=None) -> (B, N, E)` with
    transformers' user-level masks; called by a `LongformerModel` (with `is_index_masked` and
    `is_index_global_attn`, bool `(B, N)`), it returns the tuple `(output,)` as `LongformerSelfAttention` does."""

    def __init__(self, attention: LongformerAttention):
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, global_attention_mask=None,
                is_index_masked=None, is_index_global_attn=None, is_global_attn=None, output_attentions=False):
        if output_attentions:
            raise PatternError("patterndsl's Longformer layer cannot return attention probabilities (its ops never "
                               "form them)", hint="call the model with output_attentions=False")
        if is_index_masked is not None or is_index_global_attn is not None:     # LongformerModel's convention
            kpm = _user_mask(is_index_masked, hidden_states, "is_index_masked")
            glob = _user_mask(is_index_global_attn, hidden_states, "is_index_global_attn")
            return (self.attention(hidden_states, key_padding_mask=kpm, global_mask=glob),)
        kpm = _user_mask(attention_mask, hidden_states, "attention_mask")
        glob = _user_mask(global_attention_mask, hidden_states, "global_attention_mask")
        return self.attention(hidden_states, key_padding_mask=None if kpm is None else ~kpm, global_mask=glob)


def _user_mask(mask, x: torch.Tensor, name: str):
    """A 0/1 (B, N) mask as bool (True where 1), or None."""
    if mask is None:
        return None
    B, N = x.shape[:2]
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, N):
        got = f"({', '.join(map(str, mask.shape))})" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise PatternError(f"{name} must be a 0/1 tensor ({B}, {N}), got {got}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise PatternError(f"{name} must hold only 0 and 1 (transformers' user-level mask)",
                           hint="pass the mask you would give LongformerModel, not the extended one")
    return mask.to(device=x.device).bool()


def longformer_from_hf(module, backend: str = "auto") -> HFLongformerSelfAttention:
    """A patterndsl layer with `module`'s (a transformers `LongformerSelfAttention`) weights and window."""
    if not all(hasattr(module, a) for a, _ in _PAIRS) or not hasattr(module, "one_sided_attn_window_size"):
        raise PatternError(f"expected a transformers LongformerSelfAttention, got {type(module).__name__}")
    ref = module.query
    layer = LongformerAttention(module.embed_dim, module.num_heads, window=2 * module.one_sided_attn_window_size,
                                bias=ref.bias is not None, output_projection=False, backend=backend)
    layer.to(device=ref.weight.device, dtype=ref.weight.dtype)
    with torch.no_grad():
        for ours, theirs in _PAIRS:
            src, dst = getattr(module, theirs), getattr(layer, ours)
            dst.weight.copy_(src.weight)
            if src.bias is not None:
                dst.bias.copy_(src.bias)
    return HFLongformerSelfAttention(layer).train(module.training)
