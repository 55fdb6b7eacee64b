"""Near + far in one softmax: exact scores on the stage's mask (the near field), a FAVOR+ estimate of
`exp(s_ij)` on every other key the stage could see (the far field: all keys, or the keys `j <= i` when causal),
normalised together:

    out_i = (sum_{j near} e^{s_ij} v_j + sum_{j far} E_ij v_j) / (sum_{j near} e^{s_ij} + sum_{j far} E_ij)

with `s_ij = scale * q_i . k_j` and the estimate `E_ij = phi(q_i) . phi(k_j)`, where, for `x' = x * sqrt(scale)`
(`scale = 1/sqrt(d)` gives FAVOR+'s `d^(-1/4)`) and the projection `W` `[m, d]` of the feature map:

    phi(x) = m^(-1/2) exp(x' W^T - |x'|^2 / 2)          (so E[phi(q) . phi(k)] = exp(q' . k') = e^{s_ij})

No `eps` is added (the estimate then does not depend on the stabilisers below). Computed in O(N m d): the far
sums are the totals over all (or the earlier) keys, `phi(q_i) . sum_j phi(k_j) v_j^T`, minus the near terms,
found on the near field's tiles: never N x N. Stabilisers: `phi(q_i)` is computed as `exp(a - c_i)` with
`c_i = max_f a_f(q_i)`, `phi(k_j)` as `exp(a - c)` with one `c` per (batch, head) over its unpadded keys; the
far terms are then on the scale `exp(c_i + c)` and rows are normalised against `M_i = max(max_near s_ij,
c_i + c)`, so no exponential overflows however large the scores.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Far:
    """The far field of a softmax stage: FAVOR+ features `favor` (its `eps` is not used); `causal` limits the
    far keys to `j <= i` (the stage was written with `, causal = true`)."""
    favor: object
    causal: bool = False

    def source(self) -> str:
        fm = self.favor
        return (f"favor({fm.features}, orthogonal = {str(fm.orthogonal).lower()}, scaling = {fm.scaling}, "
                f"seed = {fm.seed})")
