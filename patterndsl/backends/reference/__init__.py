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

    def scored(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0, head_offset=0,
               tables=None, projection=None):
        """A softmax stage with score terms (bias, soft cap) or a far field (docs/language.md §5.5)."""
        from .scores import near_far_softmax, scored_softmax
        n_q, n_k, H = q.shape[2], k.shape[2], q.shape[1]
        near = dense_mask(stage.mask, n_q, n_k, runtime, device=q.device, q_offset=q_offset)
        k, v = repeat_kv(k, H), repeat_kv(v, H)
        far = stage.score.far
        if far is None:
            return scored_softmax(q, k, v, near, scale, stage.score, tables or {}, key_padding_mask, q_offset,
                                  head_offset)
        from ...ir import mask as M
        base = dense_mask(M.CAUSAL if far.causal else M.FULL, n_q, n_k, device=q.device, q_offset=q_offset)
        return near_far_softmax(q, k, v, near, base, projection, scale, key_padding_mask)

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
