"""Exports of compiled patterns to other attention libraries (FlexAttention)."""
from __future__ import annotations

from .flex import flex_block_mask, to_flex

__all__ = ["flex_block_mask", "to_flex"]
