"""Decode benchmark: the time of one `op.decode` step (one new token) at a context of 1k and 64k tokens, against
SDPA over the whole cache, written to its own section of BENCHMARKS.md.

    python benchmarks/decode.py                          # every case at 1k and 64k (a few minutes on 2 cores)
    python benchmarks/decode.py --sizes 1024 --steps 5 --no-write

Shapes: fp32, B = 1, H = 8 query heads over H_kv = 2 kv heads (grouped-query attention), D = 64. Each case
fills a cache with the context (`op.decode` over the prompt: a prefill on the op's kernels; the `causal` row,
whose prefill is quadratic, fills its key buffer directly), checks one step against the op at its offset, then
times `--steps` single-token steps interleaved with SDPA over a cache of the same length (grouped heads, no
mask: a query at the end of a causal cache sees every key), and reports the medians. A step also appends its
key, so the context grows by one per step.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                 # measure the checkout this file is in
import patterndsl as pd  # noqa: E402

B, H, HKV, D = 1, 8, 2, 64
SIZES = (1024, 65536)
CASES = {
    "sliding_window": ("sliding_window", dict(window=512)),
    "longformer causal": ("longformer", dict(window=1024, globals={0, 1, 2, 3}, causal=True)),
    "performer causal": ("performer", dict(features=256, causal=True)),
    "causal": ("causal", {}),
}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _filled(op, n: int, direct: bool):
    """A cache holding n tokens of context."""
    cache = op.cache()
    k, v = _rand(B, HKV, n, D, seed=1), _rand(B, HKV, n, D, seed=2)
    if direct:                       # the key buffer of a softmax stage, filled without its quadratic prefill
        (state,) = cache.states.values()
        state.buffer.append(k, v, torch.ones(B, n, dtype=torch.bool), {}, 0)
        cache.length, cache.shape = n, (B, H, HKV, D, D, torch.float32, torch.device("cpu"))
        return cache, k, v
    op.decode(_rand(B, H, n, D, seed=0), k, v, cache)          # one prompt: on the op's kernels
    return cache, k, v


def _agree(op, cache, k, v) -> float:
    """One step against the op at the step's offset over every key so far (max abs error)."""
    q, kn, vn = _rand(B, H, 1, D, seed=7), _rand(B, HKV, 1, D, seed=8), _rand(B, HKV, 1, D, seed=9)
    t = cache.length
    got = op.decode(q, kn, vn, cache)
    if t > 16384 and op.name == "causal":
        return float("nan")          # the reference call would be as slow as the prefill we skipped
    want = op(q, torch.cat([k, kn], 2), torch.cat([v, vn], 2), q_offset=t)
    return (got - want).abs().max().item()


def measure(case: str, n: int, steps: int) -> dict:
    name, params = CASES[case]
    op = pd.compile(name, backend="torch", **params)
    t0 = time.perf_counter()
    cache, k, v = _filled(op, n, direct=name == "causal")
    fill = time.perf_counter() - t0
    err = _agree(op, cache, k, v)
    kc = torch.cat([k, _rand(B, HKV, steps + 1, D, seed=3)], 2)
    vc = torch.cat([v, _rand(B, HKV, steps + 1, D, seed=4)], 2)
    ours, sdpa = [], []
    for s in range(steps):
        q = _rand(B, H, 1, D, seed=100 + s)
        kn, vn = kc[:, :, n + 1 + s:n + 2 + s], vc[:, :, n + 1 + s:n + 2 + s]
        t0 = time.perf_counter()
        op.decode(q, kn, vn, cache)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, kc[:, :, :n + 2 + s], vc[:, :, :n + 2 + s],
                                                         enable_gqa=True)
        sdpa.append(time.perf_counter() - t0)
    held = max(cache.held().values())
    return {"case": case, "n": n, "ours": statistics.median(ours) * 1e3, "sdpa": statistics.median(sdpa) * 1e3,
            "fill": fill, "held": held, "err": err}


def _report(results, argv) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    lines = [f"Command: `{' '.join(['python benchmarks/decode.py'] + argv)}`  ",
             f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; date {datetime.date.today()}  ",
             f"Shapes: fp32, B = {B}, H = {H}, H_kv = {HKV}, D = {D}; one new token per step. Cells: median step time "
             "(ms); keys held by the cache; max error of a step against the op at its offset.", "",
             "| pattern | context | op.decode step | SDPA over the whole cache | keys held | error |",
             "|---|---|---|---|---|---|"]
    for r in results:
        err = "-" if r["err"] != r["err"] else f"{r['err']:.1e}"
        lines.append(f"| {r['case']} | {r['n']:,} | {r['ours']:.3f} | {r['sdpa']:.3f} | {r['held']:,} | {err} |")
    return lines + [""]


def _write(lines) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- decode:begin -->", "<!-- decode:end -->"
    block = "\n".join([begin, "## Decoding (op.decode, CPU)", ""] + lines + [end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    for case in args.cases:
        for n in args.sizes:
            with torch.no_grad():
                r = measure(case, n, args.steps)
            results.append(r)
            print(f"{case:<18} N={n:<6} step {r['ours']:.3f} ms  sdpa {r['sdpa']:.3f} ms  held {r['held']}  "
                  f"fill {r['fill']:.1f} s  err {r['err']:.1e}", flush=True)
    lines = _report(results, argv)
    print("\n".join(lines))
    if not args.no_write:
        _write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
