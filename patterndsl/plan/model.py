"""The cost model: predicted seconds of a lowering's `Work` from per-device constants.

A prediction is a sum of terms, each an amount of work times a constant calibrated on the device
(`calibrate.py`; the defaults below were measured on the 2-core CPU this project is developed on):

| term | amount | constant |
|---|---|---|
| `call` | kernel calls and Python steps | seconds per call |
| `byte` | bytes copied, gathered, padded or written back | seconds per byte |
| `flash.32`, `flash.64`, `flash.256` | score elements in torch's fused CPU flash kernel, by the rows it takes per work item (32 below 192 query rows per (batch, head), 64 below 768, else 256) | seconds per element |
| `flash.mask` | score elements read with an additive mask | extra seconds per element |
| `flash.bwd.*`, `flash.bwd.mask` | the same in its backward | seconds per element |
| `bmm`, `bmm.bwd` | score elements of gathered batched matmuls with separate softmax passes | seconds per element |
| `flex`, `flex.mask` | score elements of compiled FlexAttention (all computed blocks; partial blocks evaluate the mask) | seconds per element |
| `flex.compile` | one compile (once per shape; inductor's on-disk cache makes a later process's compile cheaper) | seconds |
| `gemm`, `elem` | matmul FLOPs, elementwise element-passes (linear attention, Luna) | seconds per unit |
| `ref`, `ref.bwd` | dense score elements of the reference | seconds per element |
| `triton`, `triton.bwd`, `sdpa.cuda` | score elements on a CUDA device (defaults only: not calibrated here) | seconds per element |
| `fit.<lowering>`, `fit.bwd.<lowering>` | a lowering's whole prediction, forward or forward+backward | measured / predicted on a probe problem (1 when absent) |

The `fit` factors carry what the terms miss for one lowering (its elementwise passes, allocations and merges
between kernel calls, which cost more on a few threads than the single-kernel probes suggest); they are
measured per lowering, separately for the forward and for forward+backward, since a lowering's backward may
be far from the flash kernel's (`backends/torch/probes.py`), and kept within [`FIT_MIN`, `FIT_MAX`].

Element terms scale with the dtype (`DTYPE_FACTOR`: float64 costs twice float32; fp16/bf16 inputs run in
float32 on the CPU). One-time terms (compiles) count fully in `Prediction.once` and, spread over `AMORTIZE`
calls, in the score a choice minimises.

>>> from patterndsl.plan.lowering import Work
>>> c = Constants.of({"call": 1e-5, "flash.64": 1e-9})
>>> p = predict(Work.of({"call": 2, "flash.64": 1e6}), c)
>>> round(p.seconds * 1e3, 3)
1.02
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .lowering import Work

AMORTIZE = 100            # calls a one-time cost (a compile) is spread over when choosing
DTYPE_FACTOR = {torch.float64: 2.0}
_PER_CALL = ("call", "byte")
FIT_MIN, FIT_MAX = 0.5, 10.0

DEFAULTS = {
    "cpu": {      # measured on the 2-core development machine (2026-11-30), fp32, 2 threads
        "call": 2.5e-5, "byte": 1.2e-10,
        "flash.32": 3.5e-9, "flash.64": 2.0e-9, "flash.256": 1.9e-9, "flash.mask": 3.0e-10,
        "flash.bwd.32": 1.3e-8, "flash.bwd.64": 7.0e-9, "flash.bwd.256": 7.0e-9, "flash.bwd.mask": 1.0e-9,
        "bmm": 1.2e-8, "bmm.bwd": 2.5e-8,
        "flex": 5.0e-9, "flex.mask": 6.0e-9, "flex.compile": 15.0,
        "gemm": 5.0e-12, "elem": 1.0e-9,
        "ref": 1.6e-8, "ref.bwd": 3.0e-8,
        "triton": 1e-7, "triton.bwd": 3e-7, "sdpa.cuda": 1e-7,
    },
    "cuda": {
        "call": 1.5e-5, "byte": 1.0e-12,
        "triton": 2.0e-12, "triton.bwd": 5.0e-12, "sdpa.cuda": 1.0e-12,
        "flex": 1.5e-12, "flex.mask": 5e-13, "flex.compile": 30.0,
        "bmm": 8.0e-12, "bmm.bwd": 2.0e-11, "gemm": 1e-14, "elem": 2e-12,
        "ref": 2e-11, "ref.bwd": 5e-11,
    },
}


@dataclass(frozen=True)
class Constants:
    """Seconds per unit of every term, and where they come from (calibrated, defaults, given)."""
    values: tuple[tuple[str, float], ...]
    source: str = "defaults"

    @staticmethod
    def of(values: dict, source: str = "given", device_type: str = "cpu") -> "Constants":
        merged = {**DEFAULTS.get(device_type, DEFAULTS["cpu"]), **values}
        return Constants(tuple(sorted(merged.items())), source)

    def __getitem__(self, term: str) -> float:
        for k, v in self.values:
            if k == term:
                return v
        raise KeyError(f"the cost model has no constant for '{term}'")

    def get(self, term: str, default: float) -> float:
        for k, v in self.values:
            if k == term:
                return v
        return default

    def fit(self, lowering: str, grad: bool) -> float:
        """The factor on `lowering`'s predicted time (forward, or forward+backward with `grad`)."""
        f = self.get(f"fit.{'bwd.' if grad else ''}{lowering}", 1.0)
        return min(max(f, FIT_MIN), FIT_MAX)

    def as_dict(self) -> dict:
        return dict(self.values)


def defaults(device_type: str) -> Constants:
    return Constants.of({}, "defaults", device_type)


@dataclass(frozen=True)
class Prediction:
    seconds: float                          # per call, steady state
    once: float                             # one-time seconds still to pay (0 when already paid)
    terms: tuple[tuple[str, float], ...]    # seconds per term

    @property
    def score(self) -> float:
        """What a choice minimises: the steady time plus the one-time cost spread over `AMORTIZE` calls."""
        return self.seconds + self.once / AMORTIZE


def predict(work: Work, constants: Constants, dtype: torch.dtype = torch.float32, paid: bool = False,
            fit: float = 1.0) -> Prediction:
    """Predicted seconds of `work` (one-time terms count unless `paid`), per-call terms times `fit`."""
    factor = DTYPE_FACTOR.get(dtype, 1.0)
    terms = tuple((t, n * constants[t] * (1.0 if t in _PER_CALL else factor) * fit) for t, n in work.counts)
    once = 0.0 if paid else sum(n * constants[t] for t, n in work.once)
    return Prediction(sum(s for _, s in terms), once, terms)


def fmt_seconds(s: float) -> str:
    """12.3 ms, 45 us, 1.20 s."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"
