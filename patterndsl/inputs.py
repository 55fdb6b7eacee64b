"""Checks of the tensors callers pass, shared by the op, the layers and the backends' public functions, so that
each mistake has one message wherever it is caught.

>>> import torch
>>> check_key_padding_mask(torch.zeros(2, 5, dtype=torch.bool), 2, 5)
>>> check_key_padding_mask(torch.zeros(2, 4, dtype=torch.bool), 2, 5)
Traceback (most recent call last):
...
patterndsl.errors.PatternError: error: key_padding_mask must be [2, 5] (batch, keys), got [2, 4]
"""
from __future__ import annotations

import torch

from .errors import PatternError


def shape_text(t) -> str:
    """`[2, 5]` for a tensor, the type's name otherwise."""
    return "[" + ", ".join(map(str, t.shape)) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


def check_key_padding_mask(mask, batch: int, n_k: int, name: str = "key_padding_mask") -> None:
    """None, or a bool tensor `[batch, n_k]` (True = padding, an ignored key; or another per-token flag
    called `name`)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise PatternError(f"{name} must be a bool tensor [B, N_k], got {got}")
    if tuple(mask.shape) != (batch, n_k):
        raise PatternError(f"{name} must be [{batch}, {n_k}] (batch, keys), got {shape_text(mask)}")
