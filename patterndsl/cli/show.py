"""`patterndsl show FILE -n N -o mask.png`: a picture of a pattern's mask, one panel per stage or head group,
with the tile grid overlaid and the density in each title; `--ascii` prints it for a terminal."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PatternError
from . import options
from .picture import ascii_picture, draw, panels

HELP = "draw a pattern's mask (PNG with the tile grid, or --ascii)"
MAX_N = 16384                                  # the picture is pooled from the dense mask: N^2 bits
FORMATS = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "show", help=HELP, description=HELP + ". Blue tiles are full, orange partial, white empty.",
        epilog="examples:\n  patterndsl show longformer -n 1024 --set window=128 -o longformer.png\n"
               "  patterndsl show my.attn -n 64 --ascii",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_file(p)
    p.add_argument("-n", "--seq-len", type=options.positive, default=512, metavar="N",
                   help="sequence length (default: 512)")
    p.add_argument("-o", "--output", metavar="PATH", help="image file to write (.png, .svg, .pdf; default: NAME.png)")
    p.add_argument("--block", type=options.positive, default=64, help="tile size of the overlaid grid (default: 64)")
    p.add_argument("--ascii", action="store_true", help="print the mask as text instead of drawing it")
    p.add_argument("--width", type=options.positive, default=64, help="characters a side with --ascii (default: 64)")
    p.set_defaults(run=run)
    return p


@options.guarded
def run(args) -> int:
    if args.seq_len > MAX_N:
        raise PatternError(f"show draws from the dense mask: N up to {MAX_N}, got {args.seq_len}",
                           hint="`patterndsl explain FILE -n N` reports the tiles and density at any N")
    if args.output and Path(args.output).suffix.lower() not in FORMATS:
        raise PatternError(f"cannot draw to {args.output}: the image formats are {', '.join(FORMATS)}")
    op = options.compile_op(args, backend="reference")
    pics = panels(op, args.seq_len, args.block)
    if args.ascii:
        print(ascii_picture(pics, args.width))
        if not args.output:
            return 0
    path = args.output or f"{op.name}.png"
    draw(pics, path, title=f"{op.name}  (N = {args.seq_len})")
    print(f"wrote {path}: {len(pics)} panel{'s' if len(pics) > 1 else ''}, "
          + "; ".join(f"{p.label} {100 * p.density:.1f}% dense" for p in pics))
    return 0
