"""The Triton backend: generated block-sparse flash attention, fused FAVOR+ linear attention, causal Luna.

Runs on CUDA devices, and on the CPU under Triton's interpreter when `TRITON_INTERPRET=1` is set before
triton is imported (the test suite does this). Kernels are imported on first use, so selecting another
backend never imports triton.

Grouped-query k, v and query offsets reach the kernels through `_interim_groups_and_offset` for now: it
repeats kv heads and, for the causal scans, front-pads the queries (the softmax kernels take the offset
through their tile plan and AUX). The gpu workstream's kernels index kv heads and read the offset
themselves, and replace that function.
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

    def softmax(self, stage, q, k, v, *, scale, key_padding_mask=None, runtime=None, q_offset=0):
        from .softmax import run_softmax      # the op has checked the inputs
        q, k, v, _, kpm = _interim_groups_and_offset(q, k, v, None, key_padding_mask)
        return run_softmax(q, k, v, stage.mask, scale=scale, key_padding_mask=kpm, runtime=runtime,
                           q_offset=q_offset)

    def linear(self, stage, q, k, v, *, projection, key_padding_mask=None, q_offset=0):
        from .favor import linear_attention
        o = q_offset if stage.causal else 0
        q, k, v, _, kpm = _interim_groups_and_offset(q, k, v, None, key_padding_mask, o)
        out = linear_attention(q, k, v, stage.normaliser.feature_map, projection, causal=stage.causal,
                               key_padding_mask=kpm)
        return out[:, :, o:]

    def nested(self, stage, q, k, v, *, p, c, key_padding_mask=None, q_offset=0):
        from .luna import nested_attention
        q, k, v, c, kpm = _interim_groups_and_offset(q, k, v, c, key_padding_mask, q_offset, align=True)
        return nested_attention(q, k, v, p, c, key_padding_mask=kpm)[:, :, q_offset:]


def _interim_groups_and_offset(q, k, v, c, key_padding_mask, q_offset: int = 0, align: bool = False):
    """INTERIM, until the gpu workstream's kernels (GQA by indexing, the query offset read in the kernels)
    replace it: k, v (and c) repeated to q's heads; with an offset o, q front-padded with o zero rows, so a
    causal scan without an offset computes each row at its position (the caller keeps rows o ..), and with
    `align` the keys cut or padded (as padding) to o + N_q, as causal Luna's kernel needs N_q == N_k."""
    H = q.shape[1]
    k, v, c = (x if x is None or x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v, c))
    if q_offset:
        q = torch.nn.functional.pad(q, (0, 0, q_offset, 0))
    if align and k.shape[2] != q.shape[2]:
        n, n_k = q.shape[2], k.shape[2]
        kpm = (key_padding_mask if key_padding_mask is not None
               else torch.zeros(k.shape[0], n_k, dtype=torch.bool, device=k.device))
        def cut(x):
            return x[:, :, :n] if n_k > n else torch.nn.functional.pad(x, (0, 0, 0, n - n_k))
        k, v, c = cut(k), cut(v), cut(c)
        key_padding_mask = kpm[:, :n] if n_k > n else torch.nn.functional.pad(kpm, (0, n - n_k), value=True)
    return q, k, v, c, key_padding_mask


BACKEND = TritonBackend()
