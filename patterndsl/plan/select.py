"""Backend selection per stage: the user's choice, or for `auto` the fastest backend that supports it."""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir.program import ProgramIR


def auto_order(device: torch.device) -> tuple[str, ...]:
    """The backends `auto` tries on `device`, fastest first."""
    return ("triton", "torch", "reference") if device.type == "cuda" else ("torch", "reference")


def select_backends(ir: ProgramIR, requested: str, device: torch.device) -> dict[str, str]:
    """Map each stage name to a backend name; a named backend that cannot run a stage is an error."""
    from ..backends import get_backend
    choice = {}
    for st in ir.stages:
        order = auto_order(device) if requested == "auto" else (requested,)
        reasons = []
        for name in order:
            try:
                why = get_backend(name).supports(st, device)
            except ImportError as e:  # an optional dependency is missing
                why = f"cannot import: {e}"
            if why is None:
                choice[st.name] = name
                break
            reasons.append(f"{name}: {why}")
        else:
            raise PatternError(f"no backend can run stage {st.name} of {ir.name} on {device}",
                               hint="; ".join(reasons))
    return choice
