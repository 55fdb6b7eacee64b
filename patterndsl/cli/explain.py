"""`patterndsl explain FILE -n N`: the plan as a readable report (per stage every candidate lowering with its
predicted time, the chosen one and why, heads and mask, tiles, FLOPs / bytes / memory as formulas in N and as
numbers, the N from which it is predicted to beat dense attention)."""
from __future__ import annotations

import argparse

from ..errors import PatternError
from . import options

HELP = "print the plan: candidate lowerings and their predicted times, the choice and why, costs in N"


def add_parser(subparsers):
    p = subparsers.add_parser(
        "explain", help=HELP, description=HELP + ".",
        epilog="examples:\n  patterndsl explain longformer -n 16384 --set window=512\n"
               "  patterndsl explain my.attn -n 4096 --head-dim 128 --device cuda --dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_file(p)
    p.add_argument("-n", "--seq-len", type=options.positive, default=4096, metavar="N",
                   help="sequence length to plan for (default: 4096)")
    p.add_argument("--head-dim", type=options.positive, default=64, metavar="D", help="head dimension (default: 64)")
    p.add_argument("--batch", type=options.positive, default=1, metavar="B", help="batch size (default: 1)")
    p.add_argument("--heads", type=options.positive, default=None, metavar="H",
                   help="heads (default: 4, or the pattern's own)")
    p.add_argument("--backward", action="store_true", help="plan for forward and backward (training)")
    options.add_device(p)
    p.add_argument("--world-size", type=options.positive, default=None, metavar="W",
                   help="also plan context parallelism over W ranks: per-rank work and bytes against ring attention")
    p.set_defaults(run=run)
    return p


@options.guarded
def run(args) -> int:
    op = options.compile_op(args)
    device = options.device(args, need=False)   # planning for a GPU needs no GPU
    try:
        plan = op.explain(seq_len=args.seq_len, head_dim=args.head_dim, device=device, dtype=options.dtype(args),
                          batch=args.batch, heads=args.heads, grad=args.backward)
    except ImportError as e:
        raise PatternError(f"the planner is not available: {e}") from None
    print(str(plan))
    if args.world_size:                    # patterndsl.distributed's report (docs/distributed.md)
        from ..distributed.report import distributed_report
        print("\n" + str(distributed_report(op, args.seq_len, args.world_size, head_dim=args.head_dim,
                                             dtype=options.dtype(args))))
    return 0
