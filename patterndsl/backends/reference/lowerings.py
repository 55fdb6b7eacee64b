"""The reference backend's lowerings: dense, obviously correct, float64-capable; `auto` takes them only when
nothing else applies (`last_resort`)."""
from __future__ import annotations

from ...plan.lowering import Lowering, Problem, Work, declare


def _work(p: Problem) -> Work:
    counts = {"ref": p.bh * max(p.n_q, 1) * max(p.n_k, 1), "call": 8}
    if p.grad:
        counts["ref.bwd"] = counts["ref"]
    return Work.of(counts)


def declare_all() -> None:
    from . import BACKEND
    declare(Lowering("reference.softmax", "reference", ("softmax",), "dense mask and plain torch math (the oracle)",
                     lambda p: None, _work, BACKEND.softmax, last_resort=True))
    declare(Lowering("reference.linear", "reference", ("linear",), "feature maps and chunked prefix sums (the oracle)",
                     lambda p: None, _work, BACKEND.linear, last_resort=True))
    declare(Lowering("reference.nested", "reference", ("nested",), "causal Luna by cumulative sums (the oracle)",
                     lambda p: None, _work, BACKEND.nested, last_resort=True))
