"""The Triton backend: generated block-sparse flash attention, fused FAVOR+ linear attention, causal Luna.

Runs on CUDA devices, and on the CPU under Triton's interpreter when `TRITON_INTERPRET=1` is set before
triton is imported (the test suite does this). Kernels are imported on first use, so selecting another
backend never imports triton.

Grouped-query k, v and query offsets: the softmax kernels index the shared kv head (dk, dv summed over its query
heads in a fixed order) and take the offset through AUX[0] and their tile plan; the causal FAVOR+ scan reads the
offset itself. FAVOR+ and Luna repeat shared kv heads (`_repeat_kv`), and causal Luna, whose kernel takes
N_q == N_k at offset 0, gets front-padded queries and aligned keys (`_aligned`).
"""
from __future__ import annotations

import os

import torch

from ...ir.program import Elu1, Favor, Linear, ReluFeatures


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"

    def supports(self, stage, device) -> str | None:
        device = torch.device(device)
        if device.type == "cpu" and not _interpreting():
            return "Triton kernels run on CUDA devices (or on the CPU with TRITON_INTERPRET=1)"
        if device.type not in ("cuda", "cpu"):
            return f"Triton kernels do not run on {device.type} devices"
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"cannot import triton: {e}"
        norm = stage.normaliser
        if getattr(stage, "score", None) is not None:
            from .scored import unsupported
            why = unsupported(stage.score)
            if why:
                return f"{why} ({stage.score.source()})"
        if isinstance(norm, Linear) and not isinstance(norm.feature_map, (Favor, ReluFeatures, Elu1)):
            return f"no Triton kernel for the feature map {type(norm.feature_map).__name__}"
        return None

    def kernel(self, stage, n_q: int, n_k: int) -> str:
        """The kernel a stage runs as (for plans and reports)."""
        from ...ir.program import Softmax
        from .codegen import is_band
        norm = stage.normaliser
        if isinstance(norm, Softmax) and getattr(stage, "score", None) is not None:
            if stage.score.far is not None:
                return ("near + far: flash attention and the near keys' FAVOR+ feature products on the near tiles "
                        "(Triton), far totals minus near terms (torch, O(N m d))")
            tables = " and per-program table-gradient bucket sums" if stage.score.tables() else ""
            return f"scored flash attention (generated score_tile and mask_tile on every tile of the layout{tables})"
        if isinstance(norm, Softmax):
            walk = "band loop bounds" if is_band(stage.mask) else "tile list of the closed-form layout"
            return (f"block-sparse flash attention ({walk}; mask inlined on partial tiles only; long rows and "
                    f"columns split, merged by log-sum-exp)")
        if isinstance(norm, Linear):
            name = {Favor: "FAVOR+", ReluFeatures: "relu", Elu1: "elu+1"}[type(norm.feature_map)]
            return f"{name} features fused with linear attention" + (
                " (chunked causal scan, running max)" if stage.causal else "")
        return "causal Luna scan"

    def block(self, head_dim: int, device) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N) of the softmax kernels for this head dim on this device."""
        from .softmax import default_blocks
        return default_blocks(head_dim, torch.device(device))[:2]

    def softmax(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
        from .softmax import run_softmax      # the op has checked the inputs; the kernels index kv heads
        return run_softmax(q, k, v, stage.mask, scale=scale, key_padding_mask=key_padding_mask, runtime=runtime,
                           q_offset=q_offset)

    def scored(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0, head_offset=0,
               tables=None, projection=None):
        """A softmax stage with a bias, learned tables and/or a soft cap (`scored.py`), or near + far
        (`near_far.py`)."""
        if stage.score.far is not None:
            from .near_far import near_far_attention
            return near_far_attention(stage, q, k, v, projection, scale=scale, key_padding_mask=key_padding_mask,
                                      runtime=runtime, q_offset=q_offset)
        from .scored import scored_attention
        return scored_attention(stage, q, k, v, scale=scale, key_padding_mask=key_padding_mask, runtime=runtime,
                                q_offset=q_offset, head_offset=head_offset, tables=tables)

    def linear(self, stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
        from .favor import linear_attention   # the causal scan reads the offset itself
        k, v, _ = _repeat_kv(q, k, v)
        return linear_attention(q, k, v, stage.normaliser.feature_map, projection, causal=stage.causal,
                                key_padding_mask=key_padding_mask, q_offset=q_offset if stage.causal else None)

    def nested(self, stage, q, k, v, *, p, c, key_padding_mask=None, q_offset=0):
        from .luna import nested_attention
        k, v, c = _repeat_kv(q, k, v, c)
        q, k, v, c, kpm = _aligned(q, k, v, c, key_padding_mask, q_offset)
        return nested_attention(q, k, v, p, c, key_padding_mask=kpm)[:, :, q_offset:]


def _repeat_kv(q, k, v, c=None):
    """k, v (and c) repeated to q's heads, for the FAVOR+ and Luna kernels, which take one kv head per query head
    (the softmax kernels index the shared head instead); autograd sums the copies' gradients."""
    H = q.shape[1]
    return tuple(x if x is None or x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v, c))


def _aligned(q, k, v, c, key_padding_mask, q_offset: int):
    """Causal Luna's kernel takes N_q == N_k and no query offset: q front-padded with `q_offset` zero rows (the
    caller keeps rows `q_offset ..`), and the keys cut or padded (as padding) to `q_offset + N_q`."""
    if q_offset:
        q = torch.nn.functional.pad(q, (0, 0, q_offset, 0))
    n, n_k = q.shape[2], k.shape[2]
    if n_k == n:
        return q, k, v, c, key_padding_mask
    kpm = key_padding_mask if key_padding_mask is not None else torch.zeros(k.shape[0], n_k, dtype=torch.bool,
                                                                          device=k.device)

    def cut(x):
        return x[:, :, :n] if n_k > n else torch.nn.functional.pad(x, (0, 0, 0, n - n_k))
    kpm = kpm[:, :n] if n_k > n else torch.nn.functional.pad(kpm, (0, n - n_k), value=True)
    return q, cut(k), cut(v), cut(c), kpm


BACKEND = TritonBackend()
