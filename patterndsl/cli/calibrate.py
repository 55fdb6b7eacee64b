"""`patterndsl calibrate`: measure the planner's cost constants on this machine now (a few seconds) and cache
them on disk, replacing an earlier calibration (`plan/calibrate.py`)."""
from __future__ import annotations

import argparse

from ..errors import PatternError
from . import options

HELP = "measure the planner's cost constants on this machine (seconds) and cache them"


def add_parser(subparsers):
    p = subparsers.add_parser(
        "calibrate", help=HELP, description=HELP + ". Plans made afterwards use them.",
        epilog="examples:\n  patterndsl calibrate\n  patterndsl calibrate --show\n"
               "  PATTERNDSL_CACHE=/tmp/pd patterndsl calibrate --threads 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=options.positive, default=None, metavar="T",
                   help="torch threads to calibrate for (default: torch's current setting)")
    p.add_argument("--show", action="store_true", help="print the cached constants, measure nothing")
    p.set_defaults(run=run)
    return p


@options.guarded
def run(args) -> int:
    import torch
    from ..backends import declare_all
    from ..plan import calibrate as C
    device = options.device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    declare_all()
    if args.show:
        consts = C.constants(device)
    else:
        if not C.probes(device.type):
            raise PatternError(f"no calibration probes for {device.type}: the planner uses its defaults")
        consts = C.calibrate(device)
    print(f"{consts.source}\ncache: {C.cache_path(device)}")
    for term, value in consts.values:
        print(f"  {term:<16} {value:.3g}")
    return 0
