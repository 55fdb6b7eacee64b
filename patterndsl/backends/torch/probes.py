"""Calibration probes of the torch backend on the CPU: a few small timed kernel calls give the cost model's
constants (`plan/model.py`), then each softmax lowering is timed once on two probe problems for its `fit`
factors (forward and forward+backward): a few seconds in all on an idle machine. Each constant is the best of
a few repetitions (the least disturbed by other work on the machine), less the call overhead, per unit of
work. Calibrate on an idle machine: under load the many small calls of the pieces and block-sparse
lowerings slow down more than one kernel call does, and their fits come out several times larger.
"""
from __future__ import annotations

import math
import time

import torch

from .flash import _BWD, _FWD

D = 64


def _best(fn, reps: int = 3) -> float:
    fn()                                               # warm-up: allocations, first-call paths
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _flash_case(batch: int, rows: int, keys: int, masked: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, rows, D, generator=g, dtype=dtype)
    k = torch.randn(batch, 4, keys, D, generator=g, dtype=dtype)
    v = torch.randn(batch, 4, keys, D, generator=g, dtype=dtype)
    mask = torch.zeros(rows, keys, dtype=dtype).masked_fill_(torch.rand(rows, keys, generator=g) < 0.1, float("-inf")) \
        if masked else None
    out, lse = _FWD(q, k, v, 0.0, False, attn_mask=mask, scale=D ** -0.5)
    dout = torch.randn_like(out)
    fwd = lambda: _FWD(q, k, v, 0.0, False, attn_mask=mask, scale=D ** -0.5)                    # noqa: E731
    bwd = lambda: _BWD(dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=D ** -0.5)  # noqa: E731
    return fwd, bwd, batch * 4 * rows * keys


def measure_cpu(device: torch.device) -> dict:
    """Constants (seconds per unit) of the torch lowerings on this CPU."""
    c: dict[str, float] = {}
    tiny = _flash_case(1, 16, 16, False)[0]
    c["call"] = _best(tiny, 10)
    src = torch.randn(1 << 23)
    dst = torch.empty_like(src)
    c["byte"] = _best(lambda: dst.copy_(src)) / (src.numel() * 4)
    for qs, (batch, rows, keys) in {32: (16, 128, 512), 64: (4, 512, 512), 256: (1, 1024, 1024)}.items():
        fwd, bwd, elems = _flash_case(batch, rows, keys, False)
        c[f"flash.{qs}"] = max(_best(fwd) - c["call"], 0.0) / elems
        c[f"flash.bwd.{qs}"] = max(_best(bwd) - c["call"], 0.0) / elems
    fwd, bwd, elems = _flash_case(4, 512, 512, True)
    c["flash.mask"] = max(_best(fwd) / elems - c["call"] / elems - c["flash.64"], 1e-13)
    c["flash.bwd.mask"] = max(_best(bwd) / elems - c["call"] / elems - c["flash.bwd.64"], 1e-13)
    c.update(_bmm(c))
    a, b = torch.randn(2048, 256), torch.randn(256, 256)
    c["gemm"] = _best(lambda: a @ b) / (2 * 2048 * 256 * 256)
    x = torch.randn(1 << 22)
    c["elem"] = _best(lambda: torch.exp(x)) / x.numel()
    c["flex"] = 2.5 * c["flash.64"]            # not timed (a compile takes seconds): compiled Flex measured at
    c["flex.mask"] = 3.0 * c["flash.64"]       # 2.2-4x the flash kernel per element computed, its mask_mod on
                                               # partial tiles about as much again (2026-11-30, 2 cores)
    c["ref"] = 1.3 * c["bmm"]
    c["ref.bwd"] = 1.3 * c["bmm.bwd"]
    c.update(_fits(c))
    return c


FIT_N = 1024        # the probe problems of the fit factors: B 1, H 4, D 64 at this length


def _fit_problems():
    """Two masks every softmax lowering of this backend runs: a windowed band with a global token
    (Longformer's shape: band, column and row pieces) and a causal band with 64 global columns (prefix LM)."""
    from ...ir import mask as M
    return (M.Union((M.Band(-128, 128, 1), M.Cols(frozenset({0})), M.Rows(frozenset({0})))),
            M.Union((M.Band(0, None, 1), M.Cols(frozenset(range(64))))))


def _fits(c: dict) -> dict:
    """`fit.<lowering>` and `fit.bwd.<lowering>`: each torch softmax lowering timed on the probe problems,
    forward and forward+backward, over what the terms measured above predict for it (the geometric mean over
    the problems it runs). Flex is not timed (a compile takes seconds)."""
    from ...ir.program import Softmax, Stage
    from ...plan.lowering import Problem, declared
    from ...plan.model import Constants, predict
    consts = Constants.of(c, "probe")
    g = torch.Generator().manual_seed(2)
    fits: dict[str, list[float]] = {}
    for mask in _fit_problems():
        stage = Stage("probe", Softmax(), mask)
        for grad in (False, True):
            q, k, v = (torch.randn(1, 4, FIT_N, D, generator=g).requires_grad_(grad) for _ in range(3))
            problem = Problem(stage, 1, 4, FIT_N, FIT_N, D, D, grad=grad)
            for lw in declared("softmax", "torch"):
                if lw.name == "torch.flex" or lw.applies(problem) is not None:
                    continue

                def call(lw=lw):
                    with torch.set_grad_enabled(grad):
                        out = lw.run(stage, q, k, v, scale=D ** -0.5, key_padding_mask=None, runtime={},
                                     q_offset=0)
                        if grad:
                            out.sum().backward()
                seconds = _best(call, 1)
                predicted = predict(lw.work(problem), consts).seconds
                fits.setdefault(f"fit.{'bwd.' if grad else ''}{lw.name}", []).append(seconds / predicted)
    return {name: math.exp(sum(math.log(x) for x in xs) / len(xs)) for name, xs in fits.items()}


def _bmm_chunk_fwd(q, k, v, allowed):
    """One gathered chunk by batched matmuls: scores, mask, softmax passes, product with V (as `blocksparse`'s
    matmul path does)."""
    s = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(~allowed[:, None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    return torch.matmul(p, v).div_(p.sum(-1, keepdim=True))


def _bmm(c: dict) -> dict:
    """The gathered-matmul chunk: scores, mask, softmax passes and the product with V, forward and backward."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 8, 128, D, generator=g)
    k = torch.randn(1, 4, 8, 512, D, generator=g)
    allowed = torch.rand(1, 8, 128, 512, generator=g) > 0.1
    elems = 4 * 8 * 128 * 512
    fwd = _best(lambda: _bmm_chunk_fwd(q, k, k, allowed)) / elems

    def bwd():
        s = torch.matmul(q, k.transpose(-1, -2)).masked_fill_(~allowed[:, None], float("-inf"))
        p = s.sub_(s.amax(-1, keepdim=True)).exp_()
        dp = torch.matmul(q, k.transpose(-1, -2)).sub_(1.0).mul_(p)
        return torch.matmul(p.transpose(-1, -2), q), torch.matmul(dp, k), torch.matmul(dp.transpose(-1, -2), q)
    return {"bmm": fwd, "bmm.bwd": _best(bwd) / elems}
