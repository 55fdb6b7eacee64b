"""CPU benchmark of the torch backend's scored path: an additive bias on explicit gathered tiles (autograd over
the scores) against the same bias riding in the fused CPU flash kernel's float mask (backends/torch/scores.py).

    python benchmarks/scores.py [--n 2048] [--rounds 5] [--threads 1]

ALiBi over a causal sliding(128) window, fp32, B = 1, H = 8, D = 64, forward + backward. Both paths run in one
process, interleaved (one call of each in turn), so a busy machine slows them alike: read the ratio. The paths
are checked to agree first.
"""
from __future__ import annotations

import argparse
import time

import torch

import patterndsl as pd
import patterndsl.backends.torch.scores as S

SRC = ("pattern alibi_window(heads: int = 8) { attend softmax over sliding(128), causal = true, "
       "bias = -alibi_slope(h, heads) * abs(i - j) }")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    real = S.fused_bias
    op = pd.compile(SRC, backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, a.n, 64, generator=g).requires_grad_() for _ in range(3))

    def once(fused: bool):
        S.fused_bias = real if fused else (lambda *args: False)
        try:
            t = time.perf_counter()
            out = op(q, k, v)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            return time.perf_counter() - t, out.detach(), grads
        finally:
            S.fused_bias = real

    ref, new = once(False), once(True)
    for x, y in zip((ref[1], *ref[2]), (new[1], *new[2])):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
    times = {False: [], True: []}
    for _ in range(a.rounds):
        for fused in (False, True):
            times[fused].append(once(fused)[0])
    before, after = (sorted(times[f])[len(times[f]) // 2] for f in (False, True))
    print(f"N={a.n} H=8 D=64 causal sliding(128) + ALiBi, fwd+bwd, {a.threads} thread(s), median of {a.rounds}: "
          f"explicit tiles {before * 1e3:.0f} ms, bias in the flash mask {after * 1e3:.0f} ms: {before / after:.2f}x")


if __name__ == "__main__":
    main()
