"""Per-call overhead of the op at small N: `op(q, k, v)` against SDPA with the pattern's bool mask and with the
same mask as an additive float mask, called in turn (interleaved) many times in one process.

    python benchmarks/overhead.py                       # N = 256, every softmax built-in, 1 thread, 300 rounds
    python benchmarks/overhead.py -n 16 --threads 2 --rounds 500 --grad

Prints min and median milliseconds per method and auto / (SDPA + bool mask); min is the least disturbed by
other work on the machine. Shapes: fp32, B = 1, H = 4, D = 64.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout's patterndsl
PATTERNS = ("longformer", "bigbird", "sliding_window", "sparse_transformer", "dilated_window", "prefix_lm")


def measure(pattern: str, n: int, rounds: int, grad: bool) -> dict:
    import patterndsl as pd
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g).requires_grad_(grad) for _ in range(3))
    op = pd.compile(pattern)
    allowed = op.mask(n)
    additive = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def done(out):
        if grad:
            out.sum().backward()

    methods = {"auto": lambda: done(op(q, k, v)), "sdpa_bool": lambda: done(sdpa(q, k, v, attn_mask=allowed)),
               "sdpa_float": lambda: done(sdpa(q, k, v, attn_mask=additive))}
    times = {name: [] for name in methods}
    with torch.set_grad_enabled(grad):
        for fn in methods.values():
            fn()
        for _ in range(rounds):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {"lowering": ", ".join(sorted({lw.name for lw in op._fast.values()})),
            **{name: (min(t) * 1e3, statistics.median(t) * 1e3) for name, t in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--grad", action="store_true", help="forward+backward")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"N = {args.n}, {'fwd+bwd' if args.grad else 'fwd'}, {args.threads} thread(s), {args.rounds} rounds; "
          "ms min / median")
    for p in args.patterns:
        r = measure(p, args.n, args.rounds, args.grad)
        ratio = (r["auto"][0] / r["sdpa_bool"][0], r["auto"][1] / r["sdpa_bool"][1])
        print(f"{p:18s} auto {r['auto'][0]:.3f} / {r['auto'][1]:.3f}  sdpa+bool {r['sdpa_bool'][0]:.3f} / "
              f"{r['sdpa_bool'][1]:.3f}  sdpa+float {r['sdpa_float'][0]:.3f} / {r['sdpa_float'][1]:.3f}  "
              f"auto/bool {ratio[0]:.2f} / {ratio[1]:.2f}  ({r['lowering']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
