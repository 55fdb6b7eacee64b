"""Context-parallel benchmark on the CPU (gloo over loopback): bytes each rank sends for Longformer against
ring attention, measured, written to BENCHMARKS.md.

    python benchmarks/distributed.py                       # Longformer (window 512, global 0), 64k tokens, 4 ranks
    python benchmarks/distributed.py -n 16384 --world-size 2 --no-write

Each rank runs `patterndsl.distributed.ContextParallel` on its shard (forward, then forward and backward)
and counts the bytes it hands to the network. The ring baseline passes every K/V shard around the ring
(W - 1 point-to-point steps, as ring attention's forward does) and then runs the same local attention over
all keys; its forward bytes are measured the same way, its backward bytes are the forward's twice (the K/V
blocks again, and their dK/dV). Outputs of the two are compared. Times are medians of `--repeat` calls after
a warm-up; with W processes on a 2-core machine they are not a speed claim, the bytes are the point.
Shapes: fp32, B = 1, H = 4, D = 64.
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
B, H, D = 1, 4, 64
WINDOW = 512
THREADS = 1


def _ring_kv(comm, kv, sizes):
    """Every rank's K|V by W - 1 ring steps (send to the next rank what came from the previous one)."""
    w, r = comm.world_size, comm.rank
    blocks, cur = {r: kv}, kv
    for step in range(1, w):
        src = (r - step) % w
        got = comm.exchange({(r + 1) % w: cur}, {(r - 1) % w: ((*kv.shape[:2], sizes[src], kv.shape[3]),
                                                                 kv.dtype, kv.device)}, kv.device)
        cur = blocks[src] = got[(r - 1) % w]
    return [blocks[s] for s in range(w)]


def _ring_forward(cp, q, k, v):
    """Ring baseline: gather every shard around the ring, then attend over all keys at absolute positions."""
    from patterndsl.backends.torch.softmax import softmax_attention
    from patterndsl.distributed.region import Region
    sh, mask = cp.sharding, cp.op.ir.stages[0].mask
    every = _ring_kv(cp.comm, torch.cat([k, v], -1), sh.sizes)
    full = sh.unshard(every)
    n = sh.seq_len
    outs = [softmax_attention(q[:, :, o:o + e - a], full[..., :D], full[..., D:], Region(mask, a, 0, n, n))
            for (a, e), o in zip(sh.segments[cp.rank], sh.offsets(cp.rank))]
    return torch.cat(outs, 2)


def _median(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_main(rank, world, n, repeat):
    import patterndsl as pd
    from patterndsl.distributed import ContextParallel
    op = pd.compile("longformer", window=WINDOW, globals={0}, backend="torch")
    cp = ContextParallel(op, n)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(B, H, cp.sharding.sizes[rank], D, generator=g) for _ in range(3))
    with torch.no_grad():
        out = cp(q, k, v)
    fwd_bytes = cp.bytes_sent["forward"]
    cp.comm.sent.clear()
    ring = _ring_forward(cp, q, k, v)
    ring_bytes = cp.comm.sent["forward"]
    err = (out - ring).abs().max().item()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cp.comm.sent.clear()
    cp(*leaves).sum().backward()
    bwd_bytes = cp.bytes_sent["backward"]

    def train():
        cp(*leaves).sum().backward()
    with torch.no_grad():
        t_fwd = _median(lambda: cp(q, k, v), repeat)
        t_ring = _median(lambda: _ring_forward(cp, q, k, v), repeat)
    t_train = _median(train, repeat)
    return dict(rank=rank, tokens=cp.sharding.sizes[rank], keys_in=sum(b - a for _, a, b in _needs(cp)),
                fwd=fwd_bytes, bwd=bwd_bytes, ring_fwd=ring_bytes, err=err, t_fwd=t_fwd, t_ring=t_ring,
                t_train=t_train, sharding=str(cp.sharding))


def _needs(cp):
    from patterndsl.distributed.halo import halo_plan
    return halo_plan(cp.op.ir.stages[0].mask, cp.sharding).needs[cp.rank]


def _mb(x):
    return f"{x / 2 ** 20:.2f} MB"


def _cpu() -> str:
    try:
        return re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        return platform.machine()


def table(rows, n, world, repeat) -> list[str]:
    ring_bwd = [2 * r["ring_fwd"] for r in rows]
    out = [f"Command: `python benchmarks/distributed.py -n {n} --world-size {world} --repeat {repeat}`  ",
           f"Machine: {_cpu()}, {os.cpu_count()} cores, {THREADS} thread per rank, "
           f"{world} gloo processes on one host (loopback), torch {torch.__version__}; "
           f"date {datetime.date.today().isoformat()}  ",
           f"Longformer (window {WINDOW}, global token 0) at N = {n:,}: fp32, B = {B}, H = {H}, D = {D}; "
           f"{rows[0]['sharding']}.",
           "", "| rank | tokens | keys received | sent fwd | sent bwd | ring fwd | ring bwd | fwd vs ring |",
           "|---|---|---|---|---|---|---|---|"]
    for r, rb in zip(rows, ring_bwd):
        out.append(f"| {r['rank']} | {r['tokens']:,} | {r['keys_in']:,} | {_mb(r['fwd'])} | {_mb(r['bwd'])} | "
                   f"{_mb(r['ring_fwd'])} | {_mb(rb)} | {r['fwd'] / r['ring_fwd']:.2%} |")
    worst = max(r["err"] for r in rows)
    med = lambda key: statistics.median(r[key] for r in rows)        # noqa: E731
    out += ["", f"Median over ranks of the median time per call ({world} processes sharing the machine): "
                f"forward {med('t_fwd') * 1e3:.0f} ms with the halo exchange, {med('t_ring') * 1e3:.0f} ms with "
                f"the ring baseline; forward and backward {med('t_train') * 1e3:.0f} ms. Largest difference "
                f"between the two outputs: {worst:.2g}. Ring bwd = 2 x ring fwd (K/V again plus dK/dV)."]
    return out


def write(lines):
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- distributed:begin -->", "<!-- distributed:end -->"
    block = "\n".join([begin, "## Context parallelism (CPU, gloo)", ""] + lines + [end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    from patterndsl.distributed import launch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--seq-len", type=int, default=65536)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    rows = launch(rank_main, args.world_size, args.seq_len, args.repeat, timeout=1800, threads=THREADS)
    lines = table(rows, args.seq_len, args.world_size, args.repeat)
    print("\n".join(lines))
    if not args.no_write:
        write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
