"""The machine a Triton launch is for: GPU architecture, SM count and shared memory per block (or the interpreter).

The launchers pick tile sizes, pipeline depths and grid splits from a `Target`: the CUDA device's properties,
the interpreter's (`cpu` tensors under TRITON_INTERPRET=1), or, for `meta` tensors (and CUDA devices named on a
machine without one, for plans), a target set by `pretend(...)` (default: an H100/H200), which is how
`aot_capture.py` captures the launches a GPU would get on a machine without one.

>>> import torch
>>> with pretend(80):
...     target(torch.device("meta")).smem
166912
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch

# Opt-in dynamic shared memory per block and SM counts of the data-centre parts (CUDA C programming guide,
# table of technical specifications per compute capability); other parts read theirs from the device.
SMEM_PER_BLOCK = {90: 232448, 80: 166912, 86: 101376, 89: 101376, 75: 65536}
NUM_SMS = {90: 132, 80: 108}


@dataclass(frozen=True)
class Target:
    """`arch` = 10 * major + minor (None: the interpreter), `sms` streaming multiprocessors, `smem` bytes of
    shared memory one program may ask for."""
    arch: int | None
    sms: int
    smem: int

    @property
    def interpreter(self) -> bool:
        return self.arch is None


INTERPRETER = Target(None, 4, 1 << 30)
_PRETENDED: contextvars.ContextVar[Target | None] = contextvars.ContextVar("patterndsl_target", default=None)


@contextlib.contextmanager
def pretend(arch: int, sms: int | None = None):
    """Within the block, `meta` tensors stand for a GPU of this architecture (for ahead-of-time capture)."""
    tok = _PRETENDED.set(Target(arch, sms or NUM_SMS.get(arch, 132), SMEM_PER_BLOCK.get(arch, 101376)))
    try:
        yield
    finally:
        _PRETENDED.reset(tok)


def target(device) -> Target:
    """The target of tensors on `device`."""
    device = torch.device(device)
    if device.type == "cpu":
        return INTERPRETER
    if device.type == "meta" or not torch.cuda.is_available():   # meta tensors, or plans made without a GPU
        return _PRETENDED.get() or Target(90, NUM_SMS[90], SMEM_PER_BLOCK[90])
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    smem = getattr(props, "shared_memory_per_block_optin", 0) or SMEM_PER_BLOCK.get(arch, 49152)
    return Target(arch, props.multi_processor_count, int(smem))
