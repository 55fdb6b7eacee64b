"""The `patterndsl` command line: one module per subcommand, each with `add_parser` and `run`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = ("check", "explain", "show", "emit", "bench", "demo", "diff", "reach", "calibrate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patterndsl", description="A compiler for attention patterns: check, explain, draw, emit and "
                                       "benchmark .attn programs, compare them and trace their receptive "
                                       "fields (a FILE may also name a built-in).")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"patterndsl {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subs)
    return parser


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 a user error, 2 usage or internal error)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse usage errors and --help
        return e.code if isinstance(e.code, int) else 2
    except Exception as e:  # never a traceback for the user
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
