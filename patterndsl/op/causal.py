"""Causal linear and nested stages keep their promise about dependence: a non-finite value in a key-side input
(k, v, or causal Luna's pack keys c) at position j reaches no row before j, on every backend.

Chunked scans and kernels contract over key positions with matmuls, where a later key's NaN or Inf enters an
earlier row as `0 * nan`. So the fast backends run on key-side inputs with non-finite positions set to 0, and
the rows that see such a position (query position >= j) are set to NaN afterwards, as the dense definition
makes them. Their gradients stay finite; rows that must not look are exact. Cost: one sum per key-side input
when all is finite; else a finiteness pass over them and a prefix count, O(N D). The reference backend is the
dense definition itself and runs untouched.
"""
from __future__ import annotations

import torch


def bad_keys(*keyed: torch.Tensor | None) -> torch.Tensor | None:
    """`[B, H_kv, N_k]`: whether any key-side tensor `[B, H_kv, N_k, D]` holds a non-finite value there."""
    bad = None
    for t in keyed:
        if t is not None:
            b = ~torch.isfinite(t).all(-1)
            bad = b if bad is None else bad | b
    return bad


def all_finite(*keyed: torch.Tensor | None) -> bool:
    """Whether every key-side tensor is finite, by one sum each: a NaN or Inf makes its sum non-finite, and a
    finite sum that overflows only sends the call down the exact path. False while torch.compile traces (no
    data-dependent branch in a graph: the exact path runs there), and off the CPU (reading the sums would
    synchronise a GPU stream on every call, and meta tensors have no values)."""
    tensors = [t for t in keyed if t is not None]
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in tensors):
        return False
    return all(bool(torch.isfinite(t.detach().sum())) for t in tensors)


def run_isolated(run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, offset: int,
                 **kw) -> torch.Tensor:
    """`run(q, k, v, c=..., **kw)` (c passed only when given) with non-finite key positions zeroed and the
    rows that see them set to NaN. Query row r is at position `offset + r` and sees keys 0 .. offset + r.
    When every key-side value is finite (`all_finite`), `run` gets the inputs untouched: the zeroing and the
    NaN rows are identities then, and their passes (several times the scan's own cost at N = 1k) are skipped."""
    if all_finite(k, v, c):
        return run(q, k, v, **({"c": c} if c is not None else {}), **kw)
    bad = bad_keys(k, v, c)
    zero = bad[..., None]
    k, v = k.masked_fill(zero, 0.0), v.masked_fill(zero, 0.0)
    if c is not None:
        kw["c"] = c.masked_fill(zero, 0.0)
    out = run(q, k, v, **kw)
    n_q, n_k = q.shape[2], k.shape[2]
    last = (torch.arange(n_q, device=q.device) + offset).clamp(max=n_k - 1)   # the last key row r sees
    seen = (bad.cumsum(-1) > 0).index_select(-1, last)                        # [B, H_kv, N_q]
    seen = seen.repeat_interleave(q.shape[1] // k.shape[1], dim=1)            # query head h reads kv head h // G
    return out.masked_fill(seen[..., None], float("nan"))
