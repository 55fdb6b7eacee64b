"""Soft-capping (Gemma 2; Grok): a score `s` becomes `cap * tanh(s / cap)`, smooth and bounded by `cap`.

Applied after the bias and before the mask and the normalisation. Its derivative is `1 - tanh(s / cap)^2`,
which backends need for the gradient of the score (`ds = dcapped * (1 - (capped / cap)^2)`).

>>> import torch
>>> round(float(softcap(torch.tensor(1000.0), 50.0, None)), 3)
50.0
"""
from __future__ import annotations


def softcap(s, cap: float, ops):
    """`cap * tanh(s / cap)` (with `ops` None: torch on tensors; else `ops.tanh`)."""
    if ops is None:
        import torch
        return cap * torch.tanh(s / cap)
    return ops.bin("*", cap, ops.tanh(ops.bin("/", s, cap)))


def check_cap(cap: float) -> str | None:
    """Why `cap` is not a valid soft cap (None if it is)."""
    import math
    if not (isinstance(cap, float) and math.isfinite(cap) and cap > 0):
        return f"softcap must be a finite number > 0, got {cap}"
    return None
