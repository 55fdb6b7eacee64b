"""Backends: each computes attend stages exactly as `reference` does, with its own speed and memory.

A backend module `patterndsl.backends.<name>` exposes `BACKEND`, an object with
`softmax(stage, q, k, v, *, scale, key_padding_mask, runtime)`,
`linear(stage, q, k, v, *, projection, key_padding_mask)`,
`nested(stage, q, k, v, *, p, c, key_padding_mask)` (tensors `[B, H, N, D]`, returning `[B, H, N_q, D_v]`)
and `supports(stage, device) -> str | None` (None, or why it cannot run that stage there).
Each backend also declares its lowerings (the ways it runs a stage, where they apply, what they cost) to the
planner in `<name>/lowerings.py`; `declare_all()` loads those declarations (not the kernels: backends are
imported only when first used, so torch-only users never import triton).
"""
from __future__ import annotations

import importlib

BACKEND_NAMES = ("reference", "torch", "triton")
_DECLARED = []


def get_backend(name: str):
    """The backend object called `name` (imported on first use)."""
    if name not in BACKEND_NAMES:
        raise KeyError(name)
    module = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(module, "BACKEND"):
        raise ImportError(f"backend '{name}' is not available in this build")
    return module.BACKEND


def declare_all() -> None:
    """Declare every backend's lowerings to the planner (once)."""
    if _DECLARED:
        return
    for name in BACKEND_NAMES:
        importlib.import_module(f"{__name__}.{name}.lowerings").declare_all()
    _DECLARED.append(True)
