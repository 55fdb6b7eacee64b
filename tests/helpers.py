"""Shared test helpers: comparisons whose failures name the tensor and say where and by how much."""
from __future__ import annotations

import torch


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> None:
    """`|got - want| <= atol + rtol * |want|` everywhere (compared in float64), shapes equal, non-finite values
    equal; a failure names the tensor, the worst index and both values."""
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(w)
    odd = (torch.isfinite(g) != finite) | (~finite & ~((g == w) | (g.isnan() & w.isnan())))
    if odd.any():
        at = tuple(odd.nonzero()[0].tolist())
        raise AssertionError(f"{name}: non-finite mismatch at {at}: got {g[at].item()}, want {w[at].item()}")
    err = torch.where(finite, (g - w).abs(), torch.zeros_like(g))
    excess = err - (atol + rtol * w.abs().nan_to_num(posinf=0.0, neginf=0.0))
    if excess.numel() and excess.max() > 0:
        at = tuple(torch.unravel_index(excess.argmax(), excess.shape))
        at = tuple(int(x) for x in at)
        raise AssertionError(f"{name}: |got - want| = {err[at].item():.3g} at {at} (got {g[at].item():.6g}, "
                             f"want {w[at].item():.6g}) exceeds atol {atol:g} + rtol {rtol:g} * |want|; "
                             f"max error {err.max().item():.3g}")
