"""Pointwise mask evaluation for the planner and the backends: `mask_at` (defined in `ir/dense.py`).

Tiles and gathered key lists need the mask at arbitrary pairs (`i[t, r, 1]` against `j[t, 1, c]`, say);
`mask_at` takes any broadcastable index tensors and runs the same pointwise definition as `dense_mask`.
"""
from __future__ import annotations

from ..ir.dense import mask_at

__all__ = ["mask_at"]
