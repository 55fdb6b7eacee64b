"""Patterns inside transformers models: an attention function (transformers' `AttentionInterface`) that runs each
layer's patterndsl op, and a mask function (`AttentionMaskInterface`) that hands it the positions and padding.

`apply(model, pattern, **params)` registers both under the name `patterndsl`, gives each self-attention module
of the model its op (`module.patterndsl_op`; a dict `{layer index: pattern}` gives layers different patterns,
and the layers it leaves out keep the model's own mask, run by SDPA), switches the model to them and returns
it. Transformers builds the mask once per forward through the mask function; ours returns a `PatternMask`: the
query offset (tokens already in the cache), the key offset (keys a sliding-window cache layer dropped), the
2D padding mask and the model's own mask function. The attention function then calls
`op(q, k, v, key_padding_mask=..., q_offset=...)` (grouped kv heads as they come), or, when the cache layer
dropped keys, `decode.attend_window` over the keys it kept, after checking that the pattern never needs the
dropped ones (the masks' retention rules).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import PatternError

NAME = "patterndsl"


@dataclass
class PatternMask:
    """What the mask function hands the attention function (transformers passes it through as the mask)."""
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: object = None          # the model's own mask (for layers without a pattern)
    attention_mask: torch.Tensor | None = None   # 2D, True = real token, over positions 0 .. (or None)
    device: object = None

    def padding(self) -> torch.Tensor | None:
        """bool `[B, kv_length]`, True = padding (ignored key), or None when nothing is padded."""
        if self.attention_mask is None:
            return None
        from transformers.masking_utils import prepare_padding_mask
        real = prepare_padding_mask(self.attention_mask.bool(), self.kv_length, self.kv_offset)
        real = real[:, self.kv_offset:self.kv_offset + self.kv_length]
        return None if bool(real.all()) else ~real

    def dense(self) -> torch.Tensor:
        """The model's own bool mask `[B, 1, q_length, kv_length]` (SDPA's), padding included."""
        from transformers.masking_utils import sdpa_mask
        return sdpa_mask(batch_size=self.batch_size, q_length=self.q_length, kv_length=self.kv_length,
                         q_offset=self.q_offset, kv_offset=self.kv_offset, mask_function=self.mask_function,
                         attention_mask=self.attention_mask, allow_is_causal_skip=False, device=self.device)


def _int(x) -> int:
    return int(x.reshape(-1)[0]) if isinstance(x, torch.Tensor) else int(x)


def pattern_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs) -> PatternMask:
    """The `AttentionMaskInterface` function: positions and padding, no dense mask."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise PatternError(f"patterndsl attention takes transformers' 2D padding mask, got a mask of "
                           f"{attention_mask.dim()} dims", hint="pass attention_mask (B, N) of 0/1")
    return PatternMask(batch_size, q_length, kv_length, _int(q_offset), _int(kv_offset), mask_function,
                       attention_mask, kwargs.get("device"))


def pattern_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The `AttentionInterface` function: `(output [B, N, H, D_v], None)` from the module's op."""
    if dropout and module.training:
        raise PatternError("patterndsl attention has no attention-probability dropout (its ops never form the "
                           f"probabilities), but {type(module).__name__} asks for {dropout}",
                           hint="set the model's attention dropout to 0 before training (config.attention_dropout "
                                "or config.attention_probs_dropout_prob)")
    if kwargs.get("output_attentions"):
        raise PatternError("patterndsl attention cannot return attention probabilities (its ops never form them)",
                           hint="call the model with output_attentions=False")
    mask = _as_pattern_mask(attention_mask, query, key)
    op = getattr(module, "patterndsl_op", None)
    if op is None:                                     # a layer the pattern dict leaves to the model's mask
        if mask.mask_function is None:
            from transformers.masking_utils import bidirectional_mask_function, causal_mask_function
            causal = getattr(module, "is_causal", True)
            mask.mask_function = causal_mask_function if causal else bidirectional_mask_function
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask.dense(), scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    default = query.shape[-1] ** -0.5
    if scaling is not None and abs(scaling - default) > 1e-12 * default:
        query = query * (scaling / default)            # the model's scale, relative to 1/sqrt(d)
    kpm = mask.padding()
    if mask.kv_offset:
        from ...decode import attend_window
        out = attend_window(op, query, key, value, kpm, mask.q_offset, mask.kv_offset)
    else:
        out = op(query, key, value, key_padding_mask=kpm, q_offset=mask.q_offset)
    if isinstance(out, tuple):
        raise PatternError(f"pattern {op.name} returns {len(out)} outputs; a transformers layer takes one")
    return out.transpose(1, 2).contiguous(), None


def _as_pattern_mask(mask, query, key) -> PatternMask:
    if isinstance(mask, PatternMask):
        return mask
    if mask is not None:
        raise PatternError(f"patterndsl attention got a prepared {type(mask).__name__} mask, which cannot be combined "
                           f"with a pattern", hint="pass transformers' 2D padding mask (B, N) instead")
    n_q, n_k = query.shape[2], key.shape[2]           # no mask was built: keys 0 .. n_k - 1, queries last
    return PatternMask(query.shape[0], n_q, n_k, max(n_k - n_q, 0), 0)
