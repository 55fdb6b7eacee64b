"""Cases for the gloo tests of patterndsl.distributed: each rank runs the op sharded and the single-process op
whole (on the reference backend for cases marked `reference`), on the same fresh random inputs (float64), and
reports the largest differences per tensor."""
from __future__ import annotations

import torch
import torch.distributed as dist

import patterndsl as pd
from patterndsl.distributed import ContextParallel
from patterndsl.ir import mask as M


def _inputs(op, n, B, H, D, seed, padding, dtype=torch.float64, H_kv=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)   # noqa: E731
    H_kv = H_kv or H                                                   # grouped-query attention: k, v, c have H_kv
    q, k, v = rnd(B, H, n, D), rnd(B, H_kv, n, D), rnd(B, H_kv, n, D)
    extra = {}
    for name, length in op.ir.params:
        extra[name] = rnd(H, length, D)
    if "c" in op.input_names():
        extra["c"] = rnd(B, H_kv, n, D)
    for name in sorted({x for st in op.ir.stages for x in M.runtime_inputs(st.mask)}):
        starts = torch.rand(B, n, generator=g) < 8 / max(n, 1)            # documents of ~n/8 tokens, packed
        extra[name] = starts.long().cumsum(1)
    kpm = (torch.rand(B, n, generator=g) < 0.25) if padding else None
    if padding:
        kpm[0, n // 3: n // 3 + 9] = True
    return q, k, v, kpm, extra, g


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


def inputs(op, case):
    """(q, k, v, key_padding_mask, other inputs, generator) of a case, the same on every rank."""
    dtype = getattr(torch, case.get("dtype", "float64"))
    return _inputs(op, case["n"], case.get("B", 2), case.get("H", 2), case.get("D", 8), case.get("seed", 0),
                   case.get("padding", False), dtype, case.get("H_kv"))


def run_case(rank, world, case):
    name, params, n = case["pattern"], case.get("params", {}), case["n"]
    sharding = case.get("sharding", "auto")
    op = pd.compile(name, **params)
    ref = pd.compile(name, backend="reference", **params) if case.get("reference") else op   # dense, naive
    dtype = getattr(torch, case.get("dtype", "float64"))
    q, k, v, kpm, extra, g = inputs(op, case)
    ids = {x for st in op.ir.stages for x in M.runtime_inputs(st.mask)}
    sharded = {"q", "k", "v", "c", *ids}
    full = {"q": q, "k": k, "v": v, **extra}
    floats = [nm for nm, x in full.items() if x.is_floating_point()]
    for nm in floats:
        full[nm].requires_grad_()
    outs = _flat(ref(full.pop("q"), full.pop("k"), full.pop("v"), key_padding_mask=kpm, **full))
    full = {"q": q, "k": k, "v": v, **extra}
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in outs]
    grads = torch.autograd.grad(sum((o * go).sum() for o, go in zip(outs, gouts)), [full[nm] for nm in floats],
                                allow_unused=True)
    cp = ContextParallel(op, n, sharding=sharding)
    local = {nm: cp.shard(x.detach(), dim=1 if x.dim() == 2 else 2) if nm in sharded else x.detach()
             for nm, x in full.items()}
    for nm in floats:
        local[nm].requires_grad_()
    lkpm = cp.shard(kpm, dim=1) if kpm is not None else None
    args = dict(local)
    louts = _flat(cp(args.pop("q"), args.pop("k"), args.pop("v"), key_padding_mask=lkpm, **args))
    errs, lgouts = {}, []
    for x, (o, lo, go) in enumerate(zip(outs, louts, gouts)):
        is_sharded = lo.shape[2] != o.shape[2] or x == 0
        want = cp.shard(o.detach()) if is_sharded else o.detach()
        lgouts.append(cp.shard(go) if is_sharded else go / world)
        errs[f"out{x}"] = (lo.detach() - want).abs().max().double().item() if want.numel() else 0.0
    lgrads = torch.autograd.grad(sum((o * go).sum() for o, go in zip(louts, lgouts)), [local[nm] for nm in floats],
                                 allow_unused=True)
    for nm, gr, lg in zip(floats, grads, lgrads):
        gr = torch.zeros_like(full[nm]) if gr is None else gr
        lg = torch.zeros_like(local[nm]) if lg is None else lg
        if nm in sharded:
            want = cp.shard(gr)
        else:
            lg = lg.clone()
            dist.all_reduce(lg)
            want = gr
        errs["d" + nm] = (lg - want).abs().max().double().item() if want.numel() else 0.0
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
