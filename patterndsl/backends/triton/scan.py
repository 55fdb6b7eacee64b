"""Chunked scans in parallel (flash-linear-attention's chunked form): how long a segment is, and how per-segment
local states become the state before (prefix) or after (suffix) each segment.

A scan over N tokens is cut into `n_seg` segments of `seg` tokens (a multiple of the chunk BLOCK_T) so that
`programs * n_seg` programs fill the GPU; each segment's local state is computed in parallel, combined here
with a small matrix product per (batch, head) (no loop over segments, no host sync), and a second kernel walks
each segment from its combined state. Decayed states (FAVOR+'s running max `c`) carry a reference value:
a local state is relative to `c` at its segment's end (prefix) or start (suffix), and since `c` never
decreases along the sequence every rescaling factor is `exp(<= 0)`.

>>> segments(100_000, 64, programs=16, sms=132)
(3072, 33)
"""
from __future__ import annotations

import torch

FILL = 4          # programs per SM to aim for


def segments(length: int, block_t: int, programs: int, sms: int, seg: int | None = None) -> tuple[int, int]:
    """(segment length, number of segments) for a scan of `length` tokens in chunks of `block_t` when
    `programs` programs work on each segment; `seg` (a multiple of block_t) overrides the choice."""
    chunks = max(1, -(-length // block_t))
    if seg is not None:
        seg = -(-seg // block_t) * block_t
    else:
        want = max(1, -(-FILL * sms // max(programs, 1)))
        per = -(-chunks // min(want, chunks))
        seg = per * block_t
    return seg, max(1, -(-length // seg))


def _flat(states: torch.Tensor) -> torch.Tensor:
    """`[n_seg, BH, ...]` as float32 `[BH, n_seg, F]`."""
    n, bh = states.shape[:2]
    return states.reshape(n, bh, -1).permute(1, 0, 2)


def _unflat(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2).reshape(like.shape).contiguous()


def prefix(states: torch.Tensor, c_end: torch.Tensor | None = None, c_first: torch.Tensor | None = None):
    """The state before each segment, from local states `[n_seg, BH, ...]`.

    Plain sums without `c_end`. With `c_end [BH, n_seg]` (each local state is relative to it) the state before
    segment s is relative to `c_prev[s] = c_end[s-1]` (`c_first [BH]` for s = 0): returns (states, c_prev)."""
    n = states.shape[0]
    earlier = torch.ones(n, n, dtype=torch.bool, device=states.device).tril(-1)     # [s, s'] : s' < s
    if c_end is None:
        return _unflat(earlier.to(states.dtype) @ _flat(states), states)
    c_prev = torch.cat([c_first[:, None], c_end[:, :-1]], 1)
    logw = torch.where(earlier, c_end[:, None, :] - c_prev[:, :, None], float("-inf"))
    return _unflat(torch.exp(logw) @ _flat(states), states), c_prev.contiguous()


def suffix(states: torch.Tensor, c_start: torch.Tensor | None = None, c_last: torch.Tensor | None = None):
    """The state after each segment (its later segments), from local states `[n_seg, BH, ...]`.

    Plain sums without `c_start`. With `c_start [BH, n_seg]` (each local state is relative to it) the state
    after segment s is relative to `c_ref[s] = c_start[s+1]` (`c_last [BH]` for the last): (states, c_ref)."""
    n = states.shape[0]
    later = torch.ones(n, n, dtype=torch.bool, device=states.device).triu(1)         # [s, s'] : s' > s
    if c_start is None:
        return _unflat(later.to(states.dtype) @ _flat(states), states)
    c_ref = torch.cat([c_start[:, 1:], c_last[:, None]], 1)
    logw = torch.where(later, c_ref[:, :, None] - c_start[:, None, :], float("-inf"))
    return _unflat(torch.exp(logw) @ _flat(states), states), c_ref.contiguous()


def boundaries(c: torch.Tensor, seg: int, n_seg: int, last: bool):
    """`c [BH, P]` at each segment's last position (`last`) or first position: `[BH, n_seg]`."""
    P = c.shape[1]
    idx = torch.arange(n_seg, device=c.device) * seg
    idx = torch.clamp(idx + seg - 1, max=P - 1) if last else torch.clamp(idx, max=P - 1)
    return c[:, idx]
