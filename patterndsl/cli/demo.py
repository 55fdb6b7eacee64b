"""`patterndsl demo`: the tour. Compiles every built-in, checks it against the reference on random data,
prints one line each (plan, max error, time against dense attention) and writes their pictures."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ..errors import PatternError
from . import options
from .picture import ascii_picture, draw, panels
from .workload import heads_for, make_inputs, sdpa_dense

HELP = "compile every built-in, check it against the reference, time it, draw it"
_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 3e-2, torch.bfloat16: 5e-2}


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help=HELP, description=HELP + ". Exit status 1 if any built-in disagrees with the reference.",
        epilog="examples:\n  patterndsl demo\n  patterndsl demo -n 4096 -o pictures/ --only longformer,bigbird\n"
               "  patterndsl demo --device cuda --dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--seq-len", type=options.positive, default=1024, metavar="N",
                   help="sequence length of the check and timing (default: 1024)")
    p.add_argument("--head-dim", type=options.positive, default=64, metavar="D", help="head dimension (default: 64)")
    p.add_argument("--heads", type=options.positive, default=4, help="heads (default: 4; per-head patterns: theirs)")
    options.add_device(p)
    p.add_argument("-o", "--output", default=options.cache_dir("demo"), metavar="DIR",
                   help="directory for the pictures (default: the user cache, %(default)s)")
    p.add_argument("--picture-len", type=options.positive, default=512, metavar="N",
                   help="sequence length drawn in the pictures (default: 512)")
    p.add_argument("--no-pictures", action="store_true", help="skip the pictures")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="NAME,...",
                   help="just these built-ins")
    p.add_argument("--repeat", type=options.positive, default=5, help="timed runs, interleaved (default: 5)")
    p.set_defaults(run=run)
    return p


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def max_error(op, inputs) -> float:
    """Largest |op - reference| over the outputs, the reference run in float64 on the CPU."""
    from ..op import AttentionOp
    ref = AttentionOp(op.program, op.ir, backend="reference", projection=op._projection_given)
    q, k, v, extra = inputs
    got = op(q, k, v, **extra)
    want = ref(*(_double(t).cpu() for t in (q, k, v)), **{n: _double(t).cpu() for n, t in extra.items()})
    got, want = (got,) if isinstance(got, torch.Tensor) else got, (want,) if isinstance(want, torch.Tensor) else want
    return max((g.double().cpu() - w).abs().max().item() for g, w in zip(got, want))


def interleaved_ms(fns, device, repeat: int = 3) -> list[float]:
    """Median milliseconds of each of `fns`, called in turn (one warm-up each), so that a busy machine
    slows them alike and their ratio stays meaningful."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = [[] for _ in fns]
    with torch.no_grad():
        for rnd in range(repeat + 1):
            for i, fn in enumerate(fns):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if rnd:
                    times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def plan_summary(op, n: int, head_dim: int, device, dtype) -> str:
    """A short description of the plan: the planner's own one-line summary, else the backends per stage."""
    try:
        plan = op.explain(seq_len=n, head_dim=head_dim, device=device, dtype=dtype)
    except ImportError:
        plan = None
    for attr in ("summary", "kind"):
        value = getattr(plan, attr, None)
        value = value() if callable(value) else value
        if isinstance(value, str) and value:
            return value
    kinds = {b for b in op.backends(device).values()}
    return "+".join(sorted(kinds))


def _picture(op, args) -> str:
    pics = panels(op, args.picture_len)
    try:
        path = os.path.join(args.output, f"{op.name}.png")
        draw(pics, path, title=f"{op.name}  (N = {args.picture_len})")
    except PatternError:  # no matplotlib: text pictures instead
        path = os.path.join(args.output, f"{op.name}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ascii_picture(pics) + "\n")
    return path


@options.guarded
def run(args) -> int:
    from ..api import builtins, compile as compile_
    device, dtype = options.device(args), options.dtype(args)
    names = builtins()
    for name in args.only or ():
        if name not in names:
            from ..errors import did_you_mean
            raise PatternError(f"'{name}' is not a built-in", hint=did_you_mean(name, names) or ", ".join(names))
    names = args.only or names
    if not args.no_pictures:
        os.makedirs(args.output, exist_ok=True)
    n, D = args.seq_len, args.head_dim
    print(f"patterndsl demo: {len(names)} built-ins, N={n}, D={D}, {args.dtype} on {device.type}; "
          f"error vs the float64 reference, time vs dense SDPA over the same mask")
    failures, start = [], time.perf_counter()
    for name in names:
        try:
            op = compile_(name, backend=args.backend)
            inputs = make_inputs(op, 1, args.heads, n, D, dtype, device)
            err = max_error(op, inputs)
            q, k, v, extra = inputs
            f = sdpa_dense(op, n, 1, device)
            mine, dense = interleaved_ms([lambda: op(q, k, v, **extra), lambda: f(q, k, v)], device, args.repeat)
            ok = err <= _TOL[dtype]
            plan = plan_summary(op, n, D, device, dtype)
            pic = "" if args.no_pictures else "  -> " + _picture(op, args)
            print(f"{'ok  ' if ok else 'FAIL'} {name:<22} H={heads_for(op, args.heads):<2} max err {err:.1e}  "
                  f"{mine:8.2f} ms vs {dense:8.2f} ms dense ({dense / mine:5.2f}x)  {plan}{pic}")
            if not ok:
                failures.append(name)
        except PatternError as e:
            failures.append(name)
            print(f"FAIL {name:<22} {str(e).splitlines()[0]}")
        except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError) as e:
            failures.append(name)
            print(f"FAIL {name:<22} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    took = time.perf_counter() - start
    print(f"{len(names) - len(failures)}/{len(names)} built-ins match the reference in {took:.1f} s"
          + ("" if args.no_pictures else f"; pictures in {args.output}/")
          + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0
