"""The Triton backend: generated block-sparse flash attention, fused FAVOR+ linear attention, causal Luna.

Runs on CUDA devices, and on the CPU under Triton's interpreter when `TRITON_INTERPRET=1` is set before
triton is imported (the test suite does this). Kernels are imported on first use, so selecting another
backend never imports triton.
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
        if isinstance(norm, Linear) and not isinstance(norm.feature_map, (Favor, ReluFeatures, Elu1)):
            return f"no Triton kernel for the feature map {type(norm.feature_map).__name__}"
        return None

    def kernel(self, stage, n_q: int, n_k: int) -> str:
        """The kernel a stage runs as (for plans and reports)."""
        from ...ir.program import Softmax
        from .codegen import is_band
        norm = stage.normaliser
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

    def softmax(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None):
        from .softmax import run_softmax      # the op has checked the inputs
        return run_softmax(q, k, v, stage.mask, scale=scale, key_padding_mask=key_padding_mask, runtime=runtime)

    def linear(self, stage, q, k, v, *, projection, key_padding_mask=None):
        from .favor import linear_attention
        return linear_attention(q, k, v, stage.normaliser.feature_map, projection, causal=stage.causal,
                                key_padding_mask=key_padding_mask)

    def nested(self, stage, q, k, v, *, p, c, key_padding_mask=None):
        from .luna import nested_attention
        return nested_attention(q, k, v, p, c, key_padding_mask=key_padding_mask)


BACKEND = TritonBackend()
