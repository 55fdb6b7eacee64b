"""CPU benchmark of linear attention (issue 11): causal Performer forward+backward against dense causal SDPA, and
the `patterndsl demo` cells of the linear and near+far built-ins against what the demo compares them with.

    python benchmarks/linear.py                         # every case; prints a markdown table (writes nothing)
    python benchmarks/linear.py --sizes 4096 --threads 1 --repeat 5

Every case builds its methods, checks them against each other where they compute the same function, warms each
up once, then times them interleaved (one call of each in turn, `repeat` rounds, median), so a busy machine
slows them alike: the ratio column is the number to read. Shapes: fp32, B = 1, H = 4, D = 64.

- `performer-causal` (m = 256) fwd+bwd: `pd.compile("performer", causal=True)` (the planner's choice) and
  `causal_linear_attention` with its own chunk rule, against SDPA `is_causal`.
- demo cells at N = 1024, forward under no_grad: performer (bidirectional), luna_causal, window_favor against
  the demo's dense SDPA over the op's mask; window_favor also against SDPA `is_causal` (exact softmax over every
  earlier token, the function near+far approximates).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                  # this checkout's patterndsl, not an installed one
B, H, D = 1, 4, 64


def _inputs(n, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def performer_causal(n):
    import patterndsl as pd
    from patterndsl.backends.reference.features import draw_projection
    from patterndsl.backends.torch.causal_linear import causal_linear_attention
    op = pd.compile("performer", features=256, causal=True)
    fm = op.ir.stages[0].normaliser.feature_map
    w = draw_projection(fm, D).float()
    q, k, v = _inputs(n, True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    methods = {"auto": lambda: op(q, k, v), "causal_linear": lambda: causal_linear_attention(q, k, v, fm, w),
               "sdpa is_causal": lambda: sdpa(q, k, v, is_causal=True)}
    return methods, "sdpa is_causal", True, lambda: ", ".join(sorted(set(op._lowered.values())))


def demo_cell(name, n):
    import patterndsl as pd
    from patterndsl.cli.workload import make_inputs, sdpa_dense
    op = pd.compile(name)
    q, k, v, extra = make_inputs(op, 1, H, n, D)
    dense = sdpa_dense(op, n, 1, "cpu")
    methods = {"auto": lambda: op(q, k, v, **extra), "demo dense": lambda: dense(q, k, v)}
    if name == "window_favor":
        methods["sdpa is_causal"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return methods, "demo dense", False, lambda: ", ".join(sorted(set(op._lowered.values())))


def measure(methods, grad, repeat):
    """Median milliseconds of each method, timed interleaved after one warm-up call each."""
    def call(fn):
        out = fn()
        if grad:
            out.float().square().mean().backward()
    ctx = torch.enable_grad() if grad else torch.no_grad()
    times = {name: [] for name in methods}
    with ctx:
        for rnd in range(repeat + 1):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                call(fn)
                if rnd:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[4096, 16384], help="causal Performer lengths")
    ap.add_argument("--demo-n", type=int, default=1024, help="length of the demo cells (default: the demo's)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["performer", "demo"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = []
    if "performer" not in args.skip:
        cases += [("performer-causal", n, "fwd+bwd", performer_causal) for n in args.sizes]
    if "demo" not in args.skip:
        cases += [(name, args.demo_n, "fwd", demo_cell) for name in ("performer", "luna_causal", "window_favor")]
    rows = ["| case | N | mode | method | ms | baseline / method | lowering |", "|---|---|---|---|---|---|---|"]
    for case, n, mode, make in cases:
        torch.manual_seed(0)
        methods, base, grad, lowering = make(n) if make is performer_causal else make(case, n)
        ms = measure(methods, grad, args.repeat)
        for name, t in ms.items():
            rows.append(f"| {case} | {n:,} | {mode} | {name} | {t:.1f} | {ms[base] / t:.2f} | "
                        f"{lowering() if name == 'auto' else ''} |")
        print("\n".join(rows[-len(ms):]), flush=True)
    print(f"\nfp32 B {B} H {H} D {D}, {torch.get_num_threads()} threads, median of {args.repeat} interleaved rounds\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
