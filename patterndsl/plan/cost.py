"""The cost model: allowed pairs, FLOPs and bytes of a stage as sympy expressions in the sequence length N.

Pair counts are upper bounds (`Mask.pairs`): exact for `causal`, `full` and the other bands bounded on one side
(N(N+1)/2 for causal), exact to first order in N for bounded bands, index sets, blocks, random blocks and the
intersections of bands with index sets or with unions of them (edge effects of order w^2 and overlaps of a
union's parts dropped); `where` and `same` are bounded by N^2, a union by the sum of its parts and an
intersection by its sparsest part where no closed form is known. Bands with a step s > 1 are exact at
multiples of s.

>>> from patterndsl.ir.mask import sliding
>>> pairs(sliding(4))
9*N
>>> complexity(pairs(sliding(4)))
'O(N)'
"""
from __future__ import annotations

import sympy

from ..ir import mask as M
from ..ir.program import Elu1, Linear, Softmax, Stage

N = sympy.Symbol("N", positive=True)


def pairs(m: M.Mask) -> sympy.Expr:
    """Allowed (i, j) pairs of an N x N mask, as an expression in N (each node counts its own: `Mask.pairs`)."""
    return sympy.sympify(m.pairs(N))


def complexity(expr: sympy.Expr) -> str:
    """'O(N)' or 'O(N^2)' (or 'O(1)') from the growth of `expr`."""
    degree = sympy.degree(sympy.expand(expr), N)
    return {0: "O(1)", 1: "O(N)"}.get(int(degree), f"O(N^{int(degree)})")


def lengths(ir) -> dict[str, sympy.Expr]:
    """Rows of every tensor of a program: `input` has N, a param its length, a stage its query's rows."""
    rows = {"input": N, **{name: sympy.Integer(length) for name, length in ir.params}}
    for st in ir.stages:
        rows[st.name] = rows[st.query]
    return rows


def stage_costs(st: Stage, head_dim: int, elt_bytes: int, n_q: sympy.Expr = N, n_k: sympy.Expr = N,
                length: int = 16) -> dict:
    """FLOPs, bytes moved (each input read once, the output written once) and extra memory, per (B, H);
    `length` is a nested stage's packed length."""
    d = head_dim
    if isinstance(st.normaliser, Softmax):
        p = pairs(st.mask) if (n_q, n_k) == (N, N) else n_q * n_k * (0 if st.mask == M.EMPTY else 1)
        flops = 4 * d * p
        memory = n_q * d * elt_bytes + n_q * 4  # output + log-sum-exp per row; never an N x N score matrix
        if st.score is not None:
            flops, memory = _score_costs(st.score, p, flops, memory, d, elt_bytes, n_q, n_k)
    elif isinstance(st.normaliser, Linear):
        m = getattr(st.normaliser.feature_map, "features", d)
        p = N * (N + 1) / 2 if st.causal else N ** 2     # causal: each query with the keys up to itself
        project = 0 if isinstance(st.normaliser.feature_map, Elu1) else 2 * N * m * d * 2  # elu1: elementwise
        flops = project + 4 * N * m * d  # features of q and k (x W^T), then phi(K)^T V and phi(Q) (...)
        memory = 2 * N * m * 4 + m * d * 4
    else:
        p = N * length
        flops = 8 * N * length * d
        memory = 2 * N * length * 4
    return {"pairs": sympy.simplify(p), "flops": sympy.simplify(flops), "bytes": (2 * n_q + 2 * n_k) * d * elt_bytes,
            "memory": sympy.simplify(memory)}


def _score_costs(score, p, flops, memory, d, elt_bytes, n_q, n_k):
    """A scored stage runs the explicit path: the terms per pair, and its score tiles kept for the backward
    (scores and probabilities of every allowed pair); a far field adds FAVOR+ features, totals and the near
    pairs' feature products (docs/language.md §5.6)."""
    flops = flops + score.pair_flops() * p
    memory = memory + 2 * p * elt_bytes
    if score.far is not None:
        m = score.far.favor.features
        flops = flops + 2 * (n_q + n_k) * m * d + 4 * n_k * m * d + 4 * n_q * m * d + 2 * m * p
        memory = memory + (n_q + n_k) * m * elt_bytes + m * d * 4 + p * elt_bytes
    return flops, memory


def crossover(flops: sympy.Expr, head_dim: int) -> float | None:
    """The N above which `flops` is below dense attention's 4 d N^2, or None if it never is."""
    dense = 4 * head_dim * N ** 2
    for n in (2 ** k for k in range(4, 31)):
        if float(flops.subs(N, n)) < float(dense.subs(N, n)):
            return n
    return None
