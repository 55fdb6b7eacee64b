"""`patterndsl bench FILE`: times the compiled op against dense SDPA (the same mask, materialised) and, where
the pattern exports to it, compiled FlexAttention, over a range of N; prints a table (and optionally a plot)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import PatternError
from ..ir.program import INPUT, Softmax
from . import options
from .workload import heads_for, make_inputs, runtime_example, sdpa_dense, time_ms

HELP = "time the compiled op against dense SDPA and FlexAttention over N"


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help=HELP, description=HELP + ". Times are medians of --repeat runs (forward, no grad).",
        epilog="examples:\n  patterndsl bench longformer --set window=256 --sizes 1024,2048,4096\n"
               "  patterndsl bench my.attn --device cuda --dtype bfloat16 --sizes 4096,16384,65536 --plot b.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_file(p)
    p.add_argument("--sizes", type=options.sizes, metavar="N,N,...",
                   help="sequence lengths (default: 1024,2048,4096 on cpu; 4096,...,32768 on cuda)")
    p.add_argument("--batch", type=options.positive, default=1, help="batch size (default: 1)")
    p.add_argument("--heads", type=options.positive, default=4, help="heads (default: 4; per-head patterns: theirs)")
    p.add_argument("--head-dim", type=options.positive, default=64, metavar="D", help="head dimension (default: 64)")
    options.add_device(p)
    p.add_argument("--repeat", type=options.positive, default=5, help="timed runs per cell (default: 5)")
    p.add_argument("--warmup", type=options.non_negative, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                   help="include compiled FlexAttention (default: on for cuda; on cpu compiling takes ~30 s)")
    p.add_argument("--plot", metavar="PATH", help="also draw time against N to this image file")
    p.set_defaults(run=run)
    return p


def flex_problem(op) -> str | None:
    """Why FlexAttention cannot compute this op (None if it can: softmax stages over the input, one scale)."""
    stages = [op.ir.stage(o) for o in op.ir.outputs] if op.ir.by_heads else list(op.ir.stages)
    if op.ir.params or len(stages) > 1 and not op.ir.by_heads:
        return "a multi-stage program"
    if any(not isinstance(st.normaliser, Softmax) for st in stages):
        return "not softmax attention"
    if any(st.query != INPUT or st.keys != INPUT for st in stages):
        return "reads a param or stage"
    if len({st.normaliser.scale for st in stages}) > 1:
        return "per-head scales"
    return None


def _flex_runner(op, B, H, n, device):
    from torch.nn.attention.flex_attention import flex_attention
    from ..export.flex import flex_block_mask
    runtime = runtime_example(op, B, n, device)
    bm = flex_block_mask(op, B if runtime else None, H if op.ir.by_heads else None, n, n, device=device,
                         runtime=runtime)
    scale = op.ir.stage(op.ir.outputs[0]).normaliser.scale
    compiled = _compiled_flex(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=bm, scale=scale)


_COMPILED = {}


def _compiled_flex(fn):
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(fn, dynamic=False)
    return _COMPILED["flex"]


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.live = total, 0, sys.stderr.isatty()

    def step(self, what: str):
        if self.live:
            filled = 24 * self.done // max(1, self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} {what:<28}")
            sys.stderr.flush()
        self.done += 1

    def close(self):
        if self.live:
            sys.stderr.write("\r" + " " * 64 + "\r")
            sys.stderr.flush()


def _measure(fn, device, args) -> float | str:
    try:
        return time_ms(fn, device, repeat=args.repeat, warmup=args.warmup)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return "oom"


def _fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else x


@options.guarded
def run(args) -> int:
    device, dtype = options.device(args), options.dtype(args)
    if args.plot:                                 # before any timing: a plot that cannot be drawn fails now
        from .picture import _pyplot
        from .show import FORMATS
        _pyplot("--plot", "or drop --plot")
        if Path(args.plot).suffix.lower() not in FORMATS:
            raise PatternError(f"cannot draw to {args.plot}: the image formats are {', '.join(FORMATS)}")
    op = options.compile_op(args)
    sizes = args.sizes or ([1024, 2048, 4096] if device.type == "cpu" else [4096, 8192, 16384, 32768])
    why_not = flex_problem(op)
    use_flex = (device.type == "cuda") if args.flex is None else args.flex
    if args.flex and why_not:
        raise PatternError(f"FlexAttention cannot run {op.name}: {why_not}", hint="drop --flex")
    use_flex = use_flex and why_not is None
    H = heads_for(op, args.heads)
    plan = ", ".join(sorted(set(op.backends(device).values())))
    bar = Progress(len(sizes) * (3 if use_flex else 2))
    rows = []
    for n in sizes:
        q, k, v, extra = make_inputs(op, args.batch, H, n, args.head_dim, dtype, device)
        bar.step(f"N={n} patterndsl")
        mine = _measure(lambda: op(q, k, v, **extra), device, args)
        bar.step(f"N={n} sdpa")
        dense = _measure(lambda f=sdpa_dense(op, n, args.batch, device): f(q, k, v), device, args)
        flex = "-"
        if use_flex:
            bar.step(f"N={n} flex (compiling)")
            flex = _measure(lambda f=_flex_runner(op, args.batch, H, n, device): f(q, k, v), device, args)
        speed = f"{dense / mine:.2f}x" if isinstance(mine, float) and isinstance(dense, float) else "-"
        rows.append((n, mine, dense, flex, speed))
    bar.close()
    params = ", ".join(f"{k}={v}" for k, v in op.ir.bindings)
    print(f"{op.name}({params}) on {device.type}, {args.dtype}, B={args.batch} H={H} D={args.head_dim}, "
          f"backend {plan}; median ms of {args.repeat}")
    print("| N | patterndsl ms | SDPA dense ms | Flex ms | speedup vs dense |")
    print("|---:|---:|---:|---:|---:|")
    for n, mine, dense, flex, speed in rows:
        print(f"| {n} | {_fmt(mine)} | {_fmt(dense)} | {_fmt(flex)} | {speed} |")
    if not use_flex:
        print(f"(Flex: {why_not or 'pass --flex to include it'})")
    if args.plot:
        _plot(rows, args.plot, op.name, device.type)
        print(f"wrote {args.plot}")
    return 0


def _plot(rows, path, name, device):
    from .picture import _pyplot
    plt = _pyplot("--plot", "or drop --plot")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for col, label in ((1, "patterndsl"), (2, "SDPA dense"), (3, "FlexAttention")):
        pts = [(r[0], r[col]) for r in rows if isinstance(r[col], float)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{name} on {device}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
