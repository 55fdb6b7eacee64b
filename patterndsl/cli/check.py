"""`patterndsl check FILE...`: parse and check programs; one summary line each, the error rendering if bad.
With `--prove`, also what each program guarantees for every N (`patterndsl.analysis`): future keys per stage
and through the dataflow, rows with no key, allowed pairs, density and tiles as expressions in N."""
from __future__ import annotations

import argparse
import sys

from ..errors import PatternError

HELP = "check .attn files (or built-in names): syntax, names, types, values"


def add_parser(subparsers):
    p = subparsers.add_parser("check", help=HELP, description=HELP + ". Exit 0 if all are good, 1 if any is bad.",
                              epilog="examples:\n  patterndsl check examples/*.attn\n"
                                     "  patterndsl check --prove examples/sink_window.attn sliding_window",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="a .attn path or a built-in name")
    p.add_argument("--prove", action="store_true",
                   help="also print what each program guarantees for every N (with default parameters)")
    p.add_argument("-n", "--bound", type=int, default=1024, metavar="N",
                   help="with --prove: check sizes up to N where no proof for every N is found (default: 1024)")
    p.set_defaults(run=run)
    return p


def _programs(target: str):
    from ..api import builtin, builtins, load_all
    from pathlib import Path
    path = Path(target)
    if not path.exists() and target in builtins():
        return target, [builtin(target)]
    if path.is_dir():
        raise PatternError(f"{target} is a directory, not a .attn file")
    if not path.exists():
        raise PatternError(f"no such file or built-in: {target}",
                           hint=f"built-ins: {', '.join(builtins())}")
    return target, list(load_all(path))


def run(args) -> int:
    bad = 0
    for target in args.files:
        try:
            label, programs = _programs(target)
        except PatternError as e:   # deep nesting too: the parser bounds depth and reports it as one
            print(str(e), file=sys.stderr)
            bad += 1
            continue
        for prog in programs:
            ir = prog.lower() if all(p.default is not None for p in prog.pattern.params) else None
            stages = f"{len(ir.stages)} stage{'s' * (len(ir.stages) != 1)}" if ir else "parameters required"
            print(f"{label}: ok - {prog.signature()} - {stages}")
            if args.prove and ir is not None:
                bad += _prove(ir, args.bound)
    return 1 if bad else 0


def _prove(ir, bound: int) -> int:
    from ..analysis.checks import program_properties
    try:
        props = program_properties(ir, bound)
    except PatternError as e:
        print(str(e), file=sys.stderr)
        return 1
    print("\n".join("  " + line for line in str(props).splitlines()))
    return 0
