"""`patterndsl emit FILE`: the Triton source generated for a pattern (the mask predicate inlined in its
kernels), printed or written to a file."""
from __future__ import annotations

import argparse

from ..errors import PatternError
from . import options

HELP = "print the Triton mask functions generated for a pattern (inlined by the block-sparse kernels)"


def _constexpr(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    try:
        return name.strip(), int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=INT, got '{text}'") from None


def add_parser(subparsers):
    p = subparsers.add_parser(
        "emit", help=HELP, description=HELP + ".",
        epilog="examples:\n  patterndsl emit sliding_window --set window=256\n"
               "  patterndsl emit my.attn -D BLOCK_M=64 -D BLOCK_N=64 -o kernels.py",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_file(p)
    p.add_argument("-D", "--constexpr", action="append", type=_constexpr, default=[], metavar="NAME=INT",
                   help="a compile-time constant of the kernels (BLOCK_M, BLOCK_N, SPLIT, num_warps, num_stages); repeatable")
    p.add_argument("-o", "--output", metavar="PATH", help="write the source here instead of printing it")
    p.set_defaults(run=run)
    return p


@options.guarded
def run(args) -> int:
    op = options.compile_op(args, backend="reference")
    try:
        source = op.emit(**dict(args.constexpr))
    except ImportError as e:
        raise PatternError(f"the Triton code generator is not available: {e}") from None
    options.note_without_triton("the generated source")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(source)
        print(f"wrote {args.output}: {source.count(chr(10)) + 1} lines")
    else:
        print(source)
    return 0
