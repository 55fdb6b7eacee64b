"""`patterndsl diff A B`: are two patterns the same? Equal, A within B, B within A, or neither, proved for
every N where the closed forms decide it (else checked up to -n N), with pairs (i, j, N) that differ."""
from __future__ import annotations

import argparse

from . import options

HELP = "compare two patterns: equal, A within B, B within A, or neither (proved for every N when possible)"
EPILOG = """\
A and B are .attn files, built-in names, or mask expressions in .attn syntax. Programs compare stage by
stage (or head range by head range) and must have the same stages, normalisers and sources; a mask compares
with a one-stage program's mask.

examples:
  patterndsl diff causal "where(j <= i)"
  patterndsl diff "sliding(1) | sliding(2)" "sliding(2)"
  patterndsl diff "window(3, 0)" causal
  patterndsl diff longformer longformer --set-b window=256
  patterndsl diff bigbird bigbird --set-b window=5 -n 2048"""


def add_parser(subparsers):
    p = subparsers.add_parser("diff", help=HELP, description=HELP + ".", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="a .attn file, a built-in name, or a mask expression")
    p.add_argument("b", metavar="B", help="the same for the other side")
    p.add_argument("-n", "--bound", type=options.positive, default=1024, metavar="N",
                   help="check every size up to N when no proof for every N is found (default: 1024)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter of both programs; repeatable")
    p.add_argument("--set-a", dest="sets_a", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter of A only; repeatable")
    p.add_argument("--set-b", dest="sets_b", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter of B only; repeatable")
    p.set_defaults(run=run)
    return p


@options.guarded
def run(args) -> int:
    from ..analysis.comparison import compare
    both = options.parse_sets(args.sets)
    params_a = {**both, **options.parse_sets(args.sets_a)}
    params_b = {**both, **options.parse_sets(args.sets_b)}
    print(compare(args.a, args.b, args.bound, params_a, params_b))
    return 0
