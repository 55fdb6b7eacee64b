"""The Triton backend's lowerings, declared to the planner (the kernels themselves are the gpu workstream's):
block-sparse flash attention, fused linear attention, causal Luna, on CUDA (or the CPU interpreter)."""
from __future__ import annotations

from ...plan.lowering import Lowering, Problem, Work, declare


def _applies(p: Problem) -> str | None:
    """On CUDA; on the CPU only under the interpreter (tests)."""
    from . import BACKEND
    return BACKEND.supports(p.stage, p.device)


def _explicit(p: Problem) -> str | None:
    return "Triton's CPU interpreter runs only when backend='triton' is asked for" if p.device.type == "cpu" else None


def _softmax_work(p: Problem) -> Work:
    from ...plan.layout import tile_layout
    from .softmax import default_blocks
    bm, bn = default_blocks(p.head_dim, p.device)[:2]
    nnz = tile_layout(p.stage.mask, p.n_q, p.n_k, bm, bn, q_offset=p.q_offset).nnz if p.n_q and p.n_k else 0
    counts = {"triton": p.bh * nnz * bm * bn, "call": 2}
    if p.grad:
        counts["triton.bwd"] = counts["triton"]
    return Work.of(counts)


def _linear_work(p: Problem) -> Work:
    fm = getattr(p.stage.normaliser, "feature_map", None)
    m = getattr(fm, "features", p.head_dim) if fm is not None else max(p.packed, 1) * p.head_dim
    elems = p.bh * (p.n_q + p.n_k) * m
    return Work.of({"triton": elems * (3 if p.grad else 1), "call": 2})


def _run(method: str):
    def run(stage, q, k, v, **kw):
        from . import BACKEND
        return getattr(BACKEND, method)(stage, q, k, v, **kw)
    return run


def declare_all() -> None:
    declare(Lowering("triton.softmax", "triton", ("softmax",),
                     "generated block-sparse flash attention (mask inlined on partial tiles, split long rows)",
                     _applies, _softmax_work, _run("softmax"), explicit=_explicit))
    declare(Lowering("triton.linear", "triton", ("linear",), "feature maps fused with linear attention",
                     _applies, _linear_work, _run("linear"), explicit=_explicit))
    declare(Lowering("triton.luna", "triton", ("nested",), "causal Luna scan", _applies, _linear_work,
                     _run("nested"), explicit=_explicit))
