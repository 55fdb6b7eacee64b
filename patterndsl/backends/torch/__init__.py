"""The torch backend: block-sparse softmax attention, linear attention, causal Luna.

Plain torch ops on any device (the default on the CPU). Softmax stages walk only the nonempty tiles of the
closed-form layout (`schedule.py`, `blocksparse.py`); a stage over `full` whose query or key side is short
(Luna's pack and unpack through l packed rows) runs as one dense product over the short side, which is
O(N * l) and cheaper than tiling l rows. Bidirectional FAVOR+ runs with in-place features and a
hand-written backward (`favor.py`); the other linear stages and causal Luna use chunked prefix sums
(`linear_scan.py`, `nested_scan.py`; memory O(N), never N x N), whose naive twins are the reference's.

Every path takes grouped-query k, v (`H_kv` heads dividing H) without repeating them: the block-sparse
kernel scores the heads of a group against one gathered kv tile, SDPA gets `enable_gqa`, the linear and
Luna scans keep one key state per kv head (Luna: per query head, its weights depend on the head's packed
queries) and broadcast it over the group. Query row r is at position `q_offset + r` everywhere.
"""
from __future__ import annotations

import torch

from ...ir import mask as M

SHORT_SIDE = 256   # a full-mask stage with at most this many queries or keys runs densely
CAUSAL_CHUNK = 256  # keys per prefix-sum chunk; causal FAVOR+ at N = 16k, m = 256: fwd+bwd 4.5 s vs 16 s at 64


class TorchBackend:
    name = "torch"

    def supports(self, stage, device) -> str | None:
        return None

    def block(self, head_dim: int, device) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) of the block-sparse softmax tiles."""
        from .softmax import BLOCK
        return BLOCK

    def kernel(self, stage, n_q: int, n_k: int) -> str:
        """The kernel a stage runs as at these lengths (for plans and reports)."""
        from ...ir.program import Linear, Softmax
        if isinstance(stage.normaliser, Softmax) and stage.score is not None:
            return ("near + far: exact tiles and FAVOR+ totals minus near terms" if stage.score.far is not None
                    else "scored tiles (gathered nonempty tiles, score terms, autograd)")
        if isinstance(stage.normaliser, Softmax):
            if _short_full(stage, n_q, n_k):
                return f"dense over the short side ({min(n_q, n_k)} rows; SDPA unless keys are padded)"
            return "block-sparse (gathered nonempty tiles, element mask on partial tiles only)"
        if isinstance(stage.normaliser, Linear):
            if _fused_favor(stage):
                return "FAVOR+ with in-place features and a hand-written backward"
            return "linear attention, " + ("chunked prefix sums" if stage.causal else "two products")
        return "causal Luna by cumulative sums"

    def softmax(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
        if _short_full(stage, q.shape[2], k.shape[2]):
            return _dense_full(q, k, v, scale, key_padding_mask)
        from .softmax import softmax_attention
        return softmax_attention(q, k, v, stage.mask, scale=scale, key_padding_mask=key_padding_mask,
                                 runtime=runtime, q_offset=q_offset)

    def scored(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0, head_offset=0,
               tables=None, projection=None):
        """A softmax stage with score terms on gathered tiles (`scores.py`), or near + far (`near_far.py`)."""
        if stage.score.far is not None:
            from .near_far import near_far_attention
            return near_far_attention(stage, q, k, v, projection, scale=scale, key_padding_mask=key_padding_mask,
                                      runtime=runtime, q_offset=q_offset)
        from .scores import scored_attention
        return scored_attention(stage, q, k, v, scale=scale, key_padding_mask=key_padding_mask, runtime=runtime,
                                q_offset=q_offset, head_offset=head_offset, tables=tables)

    def linear(self, stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
        if _fused_favor(stage) and not projection.requires_grad:
            from .favor import favor_attention
            return favor_attention(q, k, v, projection, stage.normaliser.feature_map.eps, key_padding_mask)
        from .linear_scan import linear_attention
        return linear_attention(q, k, v, stage.normaliser.feature_map, projection, causal=stage.causal,
                                key_padding_mask=key_padding_mask, chunk=CAUSAL_CHUNK, q_offset=q_offset)

    def nested(self, stage, q, k, v, *, p, c, key_padding_mask=None, q_offset=0):
        from .nested_scan import nested_attention
        return nested_attention(q, k, v, p, c, key_padding_mask=key_padding_mask, q_offset=q_offset)


def _dense_full(q, k, v, scale, key_padding_mask):
    """Softmax over every key, one dense product (the short side is short). Grouped heads fold into rows."""
    if key_padding_mask is None:     # every row has a key: SDPA's fused kernel is exact here
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                enable_gqa=k.shape[1] != q.shape[1])
    from ..reference.softmax import softmax_attention as dense   # rows may lose every key: zeros
    B, H, n, D = q.shape
    allowed = torch.ones(1, 1, dtype=torch.bool, device=q.device)
    rows = q.reshape(B, k.shape[1], H // k.shape[1] * n, D)       # a full mask: rows of a group are alike
    return dense(rows, k, v, allowed, scale, key_padding_mask)[0].reshape(B, H, n, v.shape[3])


def _short_full(stage, n_q: int, n_k: int) -> bool:
    return stage.mask == M.FULL and min(n_q, n_k) <= SHORT_SIDE


def _fused_favor(stage) -> bool:
    from ...ir.program import Favor
    return isinstance(stage.normaliser.feature_map, Favor) and not stage.causal


BACKEND = TorchBackend()
