"""A Triton kernel that applies a generated `score_tile` to one score matrix (tests of the score codegen)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def score_probe_kernel(S, OUT, N_Q, N_K, Q_OFFSET, HEAD, T0, T1, W0, W1, score_tile: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr):
    i = tl.arange(0, BM)[:, None]
    j = tl.arange(0, BN)[None, :]
    ok = (i < N_Q) & (j < N_K)
    s = tl.load(S + i * N_K + j, mask=ok, other=0.0)
    h = tl.full([1], HEAD, tl.int32)[:, None]
    tl.store(OUT + i * N_K + j, score_tile(s, i + Q_OFFSET, j, h, T0, T1, W0, W1), mask=ok)
