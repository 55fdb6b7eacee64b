"""torch's fused CPU flash-attention kernel, made safe to call from every softmax lowering of this backend.

`aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0, is_causal, attn_mask=, scale=)` computes
`(out, lse)` of `[B, H, L, D]` tensors in one pass (scores never leave a cache-sized block); it reads K/V
through their strides (overlapping `as_strided` windows work), broadcasts a float additive mask (0 / -inf)
over its size-1 dims, and its backward takes the *final* out and lse of a row, so the pieces of a row that
were computed apart and merged by log-sum-exp each get their exact gradient from one backward call apiece.

Three gaps are closed here: the kernel dies (SIGFPE) on zero-length sequences or zero heads, so those never
reach it; a row whose keys are all masked comes back with out 0 but lse 0, so its lse is set to -inf (the
contract); and the backward gets a finite lse on such rows (`exp(-inf - 0) = 0`: no NaN).
An lse of +inf given to the backward marks a row whose output this piece does not own (it was written over):
every probability of the row is then 0 and the piece sends it no gradient.

>>> import torch
>>> q = k = v = torch.randn(1, 2, 5, 4)
>>> mask = torch.zeros(5, 5); mask[2] = float("-inf")
>>> out, lse = flash_fwd(q, k, v, 0.5, mask)
>>> lse[0, 0, 2].item(), out[0, 0, 2].abs().sum().item()
(-inf, 0.0)
"""
from __future__ import annotations

import torch

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's accumulation type, in which it returns lse."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def q_split(rows: int) -> int:
    """Rows per work item inside the kernel for `rows` queries per (batch, head): 32, 64 or 256."""
    return 256 if rows >= 768 else 64 if rows >= 192 else 32


def runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors (CPU, one head dim, a floating dtype it dispatches)."""
    return (q.device.type == "cpu" and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = allowed) as the kernel's additive float mask (0 / -inf) in `dtype`."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, NEG_INF)


def flash_fwd(q, k, v, scale: float, mask: torch.Tensor | None = None, causal: bool = False,
              rows_have_keys: bool = False):
    """(out `[B, H, Lq, D]`, lse `[B, H, Lq]`) of q `[B, H, Lq, D]`, k, v `[B, H(_kv), Lk, D]` (any strides).

    `mask`: additive float, broadcastable to `[B, H, Lq, Lk]`; `causal`: key j <= row r (top-left).
    Rows with no allowed key give out 0 and lse -inf (`rows_have_keys` skips that check when the caller
    knows every row has a key).
    """
    B, H, Lq, D = q.shape
    if Lq == 0 or H == 0 or k.shape[2] == 0 or B == 0:
        return q.new_zeros(B, H, Lq, v.shape[3]), q.new_full((B, H, Lq), NEG_INF, dtype=lse_dtype(q.dtype))
    out, lse = _FWD(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if mask is not None and not rows_have_keys:
        _empty_rows_to_neg_inf(lse, mask)
    return out, lse


def _empty_rows_to_neg_inf(lse: torch.Tensor, mask: torch.Tensor) -> None:
    """Rows whose mask is all -inf get lse -inf (the kernel says 0). Only rows with lse exactly 0 are checked."""
    cand = (lse == 0).nonzero(as_tuple=True)
    if cand[0].numel() == 0:
        return
    if mask.numel() <= cand[0].numel() * mask.shape[-1]:    # many candidates: the mask's own rows, broadcast
        lse.masked_fill_(torch.isneginf(mask).all(-1), NEG_INF)
        return
    B, H, Lq = lse.shape
    full = mask.expand(B, H, Lq, mask.shape[-1])
    dead = torch.isneginf(full[cand]).all(-1)
    lse[tuple(c[dead] for c in cand)] = NEG_INF


def flash_bwd(dout, q, k, v, out, lse, scale: float, mask: torch.Tensor | None = None, causal: bool = False):
    """(dq, dk, dv) of one piece from the row's final out and lse (dk, dv shaped like k, v; any strides)."""
    B, H, Lq, D = q.shape
    if Lq == 0 or H == 0 or k.shape[2] == 0 or B == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    return _BWD(dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def merge(out_a, lse_a, out_b, lse_b):
    """Two softmax pieces of the same rows merged by log-sum-exp (`plan.schedule.merge_by_lse`): (out, lse);
    rows empty in both stay 0/-inf."""
    total = torch.logaddexp(lse_a, lse_b)                 # as `merge_by_lse` over the two, without stacking
    safe = total.masked_fill(total == NEG_INF, 0.0)
    out = torch.addcmul(out_b * torch.exp(lse_b - safe).unsqueeze(-1), out_a, torch.exp(lse_a - safe).unsqueeze(-1))
    return out.to(out_a.dtype), total
