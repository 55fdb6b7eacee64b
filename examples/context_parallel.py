"""Context parallelism on one CPU: Longformer sharded over 4 gloo processes, checked against one process.

    python examples/context_parallel.py                  # N = 8192, 4 ranks
    python examples/context_parallel.py -n 1000 --world-size 2 --pattern prefix_lm

Every rank draws the same full q, k, v (a shared seed), keeps its shard, runs the sharded op forward and
backward, and compares its rows of the output and of every gradient with the single-process op's. On a real
cluster the ranks are started by torchrun (`init_process_group("nccl")`) and each loads only its shard.
"""
from __future__ import annotations

import argparse
import sys

import torch

import patterndsl as pd
from patterndsl.distributed import ContextParallel, launch


def rank_main(rank: int, world: int, pattern: str, n: int) -> dict:
    op = pd.compile(pattern)
    cp = ContextParallel(op, seq_len=n)                       # the sharding comes from the pattern's tile costs
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g, dtype=torch.float64) for _ in range(3))
    mine = [cp.shard(x).requires_grad_() for x in (q, k, v)]  # this rank's rows: cp.positions
    out = cp(*mine)                                           # this rank's rows of the output
    out.square().sum().backward()                             # dK/dV for keys sent elsewhere come back here

    whole = [x.clone().requires_grad_() for x in (q, k, v)]   # the single-process op, for the check
    ref = op(*whole)
    ref.square().sum().backward()
    errors = [(out - cp.shard(ref)).abs().max().item()]
    errors += [(a.grad - cp.shard(b.grad)).abs().max().item() for a, b in zip(mine, whole)]
    return {"rank": rank, "rows": len(cp.positions), "error": max(errors), "bytes": cp.bytes_sent,
            "sharding": str(cp.sharding)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", default="longformer")
    ap.add_argument("-n", type=int, default=8192)
    ap.add_argument("--world-size", type=int, default=4)
    args = ap.parse_args(argv)
    results = launch(rank_main, args.world_size, args.pattern, args.n, timeout=600)
    print(results[0]["sharding"])
    ring = (args.world_size - 1) * (args.n // args.world_size) * 4 * 128 * 8    # K and V, fp64, to every other rank
    for r in results:
        print(f"rank {r['rank']}: {r['rows']} rows, max error {r['error']:.1e}, sent {r['bytes']['forward']:,} bytes "
              f"forward ({r['bytes']['forward'] / ring:.1%} of ring attention's ~{ring:,}), "
              f"{r['bytes'].get('backward', 0):,} backward")
    return 0 if all(r["error"] < 1e-10 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
