"""Cases for the gloo tests of patterndsl.distributed: each rank runs the op sharded and the single-process op
whole, on the same fresh random inputs (float64), and reports the largest differences per tensor."""
from __future__ import annotations

import torch
import torch.distributed as dist

import patterndsl as pd
from patterndsl.distributed import ContextParallel


def _inputs(op, n, B, H, D, seed, padding, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)   # noqa: E731
    q, k, v = rnd(B, H, n, D), rnd(B, H, n, D), rnd(B, H, n, D)
    extra = {}
    for name, length in op.ir.params:
        extra[name] = rnd(H, length, D)
    if "c" in op.input_names():
        extra["c"] = rnd(B, H, n, D)
    kpm = (torch.rand(B, n, generator=g) < 0.25) if padding else None
    if padding:
        kpm[0, n // 3: n // 3 + 9] = True
    return q, k, v, kpm, extra, g


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


def run_case(rank, world, case):
    name, params, n = case["pattern"], case.get("params", {}), case["n"]
    sharding, padding = case.get("sharding", "auto"), case.get("padding", False)
    B, H, D = case.get("B", 2), case.get("H", 2), case.get("D", 8)
    op = pd.compile(name, **params)
    dtype = getattr(torch, case.get("dtype", "float64"))
    q, k, v, kpm, extra, g = _inputs(op, n, B, H, D, case.get("seed", 0), padding, dtype)
    sharded = {"c"}
    leaves = [x.requires_grad_() for x in (q, k, v, *extra.values())]
    outs = _flat(op(q, k, v, key_padding_mask=kpm, **extra))
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in outs]
    grads = torch.autograd.grad(sum((o * go).sum() for o, go in zip(outs, gouts)), leaves, allow_unused=True)
    cp = ContextParallel(op, n, sharding=sharding)
    lq, lk, lv = (cp.shard(x.detach()).requires_grad_() for x in (q, k, v))
    lextra = {nm: (cp.shard(x.detach()) if nm in sharded else x.detach()).requires_grad_() for nm, x in extra.items()}
    lkpm = cp.shard(kpm, dim=1) if kpm is not None else None
    louts = _flat(cp(lq, lk, lv, key_padding_mask=lkpm, **lextra))
    errs = {}
    lgouts = []
    for x, (o, lo, go) in enumerate(zip(outs, louts, gouts)):
        is_sharded = lo.shape[2] != o.shape[2] or x == 0
        want = cp.shard(o.detach()) if is_sharded else o.detach()
        lgouts.append(cp.shard(go) if is_sharded else go / world)
        errs[f"out{x}"] = (lo.detach() - want).abs().max().double().item() if want.numel() else 0.0
    lleaves = [lq, lk, lv, *lextra.values()]
    lgrads = torch.autograd.grad(sum((o * go).sum() for o, go in zip(louts, lgouts)), lleaves, allow_unused=True)
    names = ["dq", "dk", "dv", *("d" + nm for nm in extra)]
    for nm, key, gr, lg in zip(names, ["q", "k", "v", *extra], grads, lgrads):
        gr = torch.zeros_like(leaves[names.index(nm)]) if gr is None else gr
        lg = torch.zeros_like(lleaves[names.index(nm)]) if lg is None else lg
        if key in ("q", "k", "v") or key in sharded:
            want = cp.shard(gr)
        else:
            lg = lg.clone()
            dist.all_reduce(lg)
            want = gr
        errs[nm] = (lg - want).abs().max().double().item() if want.numel() else 0.0
    errs["_bytes"] = cp.bytes_sent
    errs["_sharding"] = cp.sharding.kind
    return errs


def run_cases(rank, world, cases):
    out = {}
    for c in cases:
        try:
            out[c["id"]] = run_case(rank, world, c)
        except Exception as e:
            raise RuntimeError(f"case {c['id']}: {e}") from e
    return out


def sleep(rank, world, seconds):
    import time
    time.sleep(seconds)


def exit_on_rank_one(rank, world):
    import os
    if rank == 1:
        os._exit(3)
    return rank


def fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError(f"rank {rank} of {world} says no")
    return rank
