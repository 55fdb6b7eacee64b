"""Calibration probes of the torch backend on the CPU: a few small timed kernel calls give the cost model's
constants (`plan/model.py`), about two seconds in all. Each constant is the best of a few repetitions (the
least disturbed by other work on the machine), less the call overhead, per unit of work.
"""
from __future__ import annotations

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
    return c


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
