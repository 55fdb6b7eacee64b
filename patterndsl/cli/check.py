"""`patterndsl check FILE...`: parse and check programs; one summary line each, the error rendering if bad."""
from __future__ import annotations

import sys

from ..errors import PatternError

HELP = "check .attn files (or built-in names): syntax, names, types, values"


def add_parser(subparsers):
    p = subparsers.add_parser("check", help=HELP, description=HELP + ". Exit 0 if all are good, 1 if any is bad.")
    p.add_argument("files", nargs="+", metavar="FILE", help="a .attn path or a built-in name")
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
    return 1 if bad else 0
