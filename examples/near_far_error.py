"""How well does near + far in one softmax approximate exact softmax? (issue 14; docs/language.md §5.6)

Exact softmax over every key (causal or not) is the target. Three approximations at equal cost (FLOPs per
(batch, head) from the planner's cost model, `plan/cost.py`):

- near + far: `attend softmax over sliding(w), far = favor(m)` (the window exact, everything else estimated);
- plain FAVOR+: `attend linear(favor(m'))` with m' features, m' raised until it costs as much;
- plain window: `attend softmax over sliding(w')`, w' widened until it costs as much.

Inputs have locality, as language does: q and k are a smooth random walk over positions (nearby tokens
alike, weight 0.25 per coordinate) plus independent noise (0.1), so a row's weight sits on its neighbourhood
and a long tail. The error is `|out - exact| / |exact|` (Frobenius norms over the whole output), averaged over
2 seeds, fp64, N = 1024, H = 2, d = 64, near window w = 32 (65 keys), m = 64 features;
`PYTHONPATH=. python examples/near_far_error.py` (about 40 s on 2 shared CPU cores) printed:

    causal  near+far (w=32, m=64) 0.169  FAVOR+ (m'=121) 0.104  window (w'=241) 0.344  [FAVOR+ (m=64) 0.126]
    bidir.  near+far (w=32, m=64) 0.417  FAVOR+ (m'=145) 0.220  window (w'=145) 1.381  [FAVOR+ (m=64) 0.296]

Reading: near + far beats the plain window of equal cost (which loses the tail entirely) but not plain
FAVOR+, even at the same m (last column). FAVOR+ alone is a ratio of two estimates that share the query's
features, so a query whose features over- or underestimate every key by a common factor cancels out; near +
far compares exact near weights against estimated far ones, and that common factor no longer cancels. The
estimate of each far pair is unbiased (its error falls as m grows: tests/test_near_far.py), but for this
data the lost cancellation costs more than the exact window gains. (Bidirectional errors look large because
the exact output averages many values and has a small norm.)
"""
from __future__ import annotations

import sys

import torch

import patterndsl as pd
from patterndsl.plan.cost import N, stage_costs


def inputs(n: int, heads: int, d: int, seed: int, smooth: float = 0.25, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    walk = torch.randn(1, heads, n, d, generator=g, dtype=torch.float64).cumsum(2)
    walk = walk / walk.std(2, keepdim=True)                       # a smooth path: nearby positions alike

    def side():
        return smooth * walk + noise * torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)
    return side(), side(), torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)


def flops(op, n: int, d: int) -> float:
    return float(sum(stage_costs(st, d, 8)["flops"].subs(N, n) for st in op.ir.stages))


def equal_cost(make, start: int, target: float, n: int, d: int) -> int:
    """The smallest parameter >= start whose op costs at least `target` FLOPs."""
    x = start
    while flops(make(x), n, d) < target:
        x += 1
    return x


def compare(n=1024, heads=2, d=64, w=32, m=64, causal=True, seeds=(0, 1)):
    c = "true" if causal else "false"
    near_far = pd.compile(f"pattern nf() {{ attend softmax over sliding({w}), causal = {c}, far = favor({m}) }}",
                          backend="torch")
    exact = pd.compile(f"pattern ex() {{ attend softmax, causal = {c} }}", backend="torch")

    def favor(mm):
        return pd.compile(f"pattern fv() {{ attend linear(favor({mm})), causal = {c} }}", backend="torch")

    def window(ww):
        return pd.compile(f"pattern wd() {{ attend softmax over sliding({ww}), causal = {c} }}", backend="torch")
    target = flops(near_far, n, d)
    m2, w2 = equal_cost(favor, m, target, n, d), equal_cost(window, w, target, n, d)
    rows = {"near+far": near_far, "FAVOR+": favor(m2), "window": window(w2), "FAVOR+ same m": favor(m)}
    err = {k: 0.0 for k in rows}
    for seed in seeds:
        q, k, v = inputs(n, heads, d, seed)
        want = exact(q, k, v)
        for name, op in rows.items():
            err[name] += float((op(q, k, v) - want).norm() / want.norm()) / len(seeds)
    return err, m2, w2


def main(argv=()):
    small = "--small" in argv
    kw = dict(n=128, heads=1, d=16, w=8, m=16, seeds=(0,)) if small else {}
    out = {}
    for causal in (True, False):
        err, m2, w2 = compare(causal=causal, **kw)
        w, m = kw.get("w", 32), kw.get("m", 64)
        print(f"{'causal' if causal else 'bidir.'}  near+far (w={w}, m={m}) {err['near+far']:.3f}  "
              f"FAVOR+ (m'={m2}) {err['FAVOR+']:.3f}  window (w'={w2}) {err['window']:.3f}  "
              f"[FAVOR+ (m={m}) {err['FAVOR+ same m']:.3f}]")
        out[causal] = err
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
