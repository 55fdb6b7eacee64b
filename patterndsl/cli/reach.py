"""`patterndsl reach FILE... --layers L -n N`: which tokens can influence a query token after each layer
(one pattern repeated, or one pattern per layer), and after how many layers the query reads token 0."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PatternError
from . import options
from .show import FORMATS

HELP = "receptive fields across layers: which tokens reach a query after each layer"
EPILOG = """\
Each FILE is a .attn file, a built-in name, or a mask expression. One FILE is repeated --layers times
(default 12); several FILEs are one per layer. The residual stream is included (a token always reads
itself) unless --no-residual. Computed on closed forms and tile layouts: N = 1M takes seconds.

examples:
  patterndsl reach longformer --set window=512 --layers 12 -n 16384
  patterndsl reach "sliding(256)" --layers 6 -n 1048576
  patterndsl reach "sliding(64, 4)" "sliding(64, 2)" "sliding(64)" -n 8192 -o reach.png"""


def add_parser(subparsers):
    p = subparsers.add_parser("reach", help=HELP, description=HELP + ".", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="a .attn file, a built-in name or a mask expression")
    p.add_argument("--layers", type=options.positive, metavar="L",
                   help="layers (default: the number of FILEs, or 12 for one FILE)")
    p.add_argument("-n", "--seq-len", type=options.positive, default=4096, metavar="N",
                   help="sequence length (default: 4096)")
    p.add_argument("--query", type=options.non_negative, metavar="Q", help="the query token (default: N - 1)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter of every program; repeatable")
    p.add_argument("--no-residual", action="store_true", help="leave out the residual stream (token i reads i)")
    p.add_argument("--max-depth", type=options.positive, default=4096, metavar="D",
                   help="layers searched for the depth at which the query reads token 0 (default: 4096)")
    p.add_argument("--width", type=options.positive, default=64, help="characters per bar (default: 64)")
    p.add_argument("-o", "--output", metavar="PATH", help="also draw the fields (.png, .svg, .pdf)")
    p.set_defaults(run=run)
    return p


@options.guarded
def run(args) -> int:
    from ..analysis.receptive import reach, render
    if args.output and Path(args.output).suffix.lower() not in FORMATS:
        raise PatternError(f"cannot draw to {args.output}: the image formats are {', '.join(FORMATS)}")
    layers = args.layers or (len(args.files) if len(args.files) > 1 else 12)
    r = reach(args.files if len(args.files) > 1 else args.files[0], layers, args.seq_len, args.query,
              not args.no_residual, args.max_depth, **options.parse_sets(args.sets))
    print(render(r, args.width))
    if args.output:
        from ..analysis.drawing import draw_reach
        draw_reach(r, args.output)
        print(f"wrote {args.output}")
    return 0
