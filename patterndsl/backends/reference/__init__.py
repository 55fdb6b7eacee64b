"""The reference backend: dense masks and plain torch math; the oracle every other backend is tested against."""
from __future__ import annotations

from ...ir.dense import dense_mask
from .softmax import softmax_attention


class ReferenceBackend:
    name = "reference"

    def supports(self, stage, device) -> str | None:
        return None

    def softmax(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None):
        allowed = dense_mask(stage.mask, q.shape[2], k.shape[2], runtime, device=q.device)
        return softmax_attention(q, k, v, allowed, scale, key_padding_mask)[0]

    def linear(self, stage, q, k, v, *, projection, key_padding_mask=None):
        from .linear import linear_attention
        return linear_attention(q, k, v, stage.normaliser.feature_map, projection, causal=stage.causal,
                                key_padding_mask=key_padding_mask)

    def nested(self, stage, q, k, v, *, p, c, key_padding_mask=None):
        from .nested import nested_attention
        return nested_attention(q, k, v, p, c, key_padding_mask=key_padding_mask)


BACKEND = ReferenceBackend()
