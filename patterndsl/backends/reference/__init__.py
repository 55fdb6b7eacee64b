"""The reference backend: dense masks and plain torch math; the oracle every other backend is tested against.

It takes grouped-query k, v (`H_kv` heads dividing q's `H`) by repeating each kv head for its query heads
(the definition; the fast backends index instead), and evaluates masks at absolute query positions
(`q_offset`).
"""
from __future__ import annotations

from ...ir.dense import dense_mask
from .softmax import softmax_attention


def repeat_kv(x, heads: int):
    """`x [B, H_kv, ...]` with each kv head repeated for its `heads // H_kv` query heads: `[B, heads, ...]`."""
    if x is None or x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


class ReferenceBackend:
    name = "reference"

    def supports(self, stage, device) -> str | None:
        return None

    def softmax(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
        allowed = dense_mask(stage.mask, q.shape[2], k.shape[2], runtime, device=q.device, q_offset=q_offset)
        H = q.shape[1]
        return softmax_attention(q, repeat_kv(k, H), repeat_kv(v, H), allowed, scale, key_padding_mask)[0]

    def linear(self, stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
        from .linear import linear_attention
        H = q.shape[1]
        return linear_attention(q, repeat_kv(k, H), repeat_kv(v, H), stage.normaliser.feature_map, projection,
                                causal=stage.causal, key_padding_mask=key_padding_mask, q_offset=q_offset)

    def nested(self, stage, q, k, v, *, p, c, key_padding_mask=None, q_offset=0):
        from .nested import nested_attention
        H = q.shape[1]
        return nested_attention(q, repeat_kv(k, H), repeat_kv(v, H), p, repeat_kv(c, H),
                                key_padding_mask=key_padding_mask, q_offset=q_offset)


BACKEND = ReferenceBackend()
