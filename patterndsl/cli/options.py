"""Options shared by the user subcommands (explain, show, bench, emit, demo): FILE, `--set`, devices, errors.

`--set name=value` reads the value as an `.attn` literal, never with `eval`:

>>> parse_literal("256"), parse_literal("0.5"), parse_literal("true"), parse_literal("{0, 5}")
(256, 0.5, True, frozenset({0, 5}))
>>> parse_literal('"spans"'), parse_literal("spans")
('spans', 'spans')
>>> parse_sets(["window=8", "globals={0,1}"])
{'window': 8, 'globals': frozenset({0, 1})}
"""
from __future__ import annotations

import functools
import os
import re
import sys

from ..errors import PatternError

_INT = re.compile(r"[+-]?[0-9]+")                    # ASCII digits only, as in .attn text
_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERALS = "an int, a float, true/false, a \"string\" or a {set} of token indices"


def parse_literal(text: str, name: str = "value"):
    """An `.attn` literal: int, float, true/false, "string" (or a bare word), {set of ints}."""
    t = text.strip()
    if t in ("true", "false"):
        return t == "true"
    if _INT.fullmatch(t):
        if len(t.lstrip("+-").lstrip("0")) > 13:        # past 2^40 (and Python's 4300-digit conversion limit)
            raise PatternError(f"cannot read {name}={_clip(text)}: integers stay below 2^40 = {1 << 40}")
        return int(t)
    if _FLOAT.fullmatch(t):
        return float(t)
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'":
        return t[1:-1]
    if t.startswith("{") and t.endswith("}"):
        items = [x.strip() for x in t[1:-1].split(",")]
        if items == [""]:
            return frozenset()
        if not all(re.fullmatch(r"[0-9]{1,13}", x) for x in items):
            raise PatternError(f"cannot read {name}={text}: a set holds token indices >= 0, like {{0, 5, 9}}")
        return frozenset(int(x) for x in items)
    if t in ("True", "False"):
        raise PatternError(f"cannot read {name}={text} as an .attn literal",
                           hint="booleans are spelt true/false in .attn")
    if _WORD.fullmatch(t):
        return t
    raise PatternError(f"cannot read {name}={text} as an .attn literal", hint=f"values are {_LITERALS}")


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def parse_sets(items: list[str] | None) -> dict:
    """`["window=8", ...]` from repeated `--set` options as a dict of parameter values."""
    out = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not _WORD.fullmatch(name):
            raise PatternError(f"--set expects NAME=VALUE, got '{item}'", hint="for example --set window=256")
        out[name] = parse_literal(value, name)
    return out


# --------------------------------------------------------------------------------------------- arguments
def add_file(p) -> None:
    p.add_argument("file", metavar="FILE", help="a .attn file or a built-in name (see `patterndsl demo`)")
    p.add_argument("--pattern", metavar="NAME", help="which pattern, when FILE holds several")
    p.add_argument("--set", dest="sets", action="append", metavar="NAME=VALUE", default=[],
                   help="override a pattern parameter (an .attn literal: 256, 0.5, true, \"s\", {0,1}); repeatable")


def add_device(p, backend: bool = True) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="tensor dtype (default: float32)")
    if backend:
        p.add_argument("--backend", default="auto", choices=["auto", "reference", "torch", "triton"],
                       help="backend (default: auto: triton on cuda, torch on cpu)")


def program(args):
    """The Program named by FILE (a path or a built-in name) and `--pattern`."""
    from ..api import load, resolve
    if args.pattern and (os.path.exists(args.file) or args.file.endswith(".attn")):
        return load(args.file, pattern=args.pattern)
    return resolve(args.file)


def compile_op(args, backend: str | None = None, **extra):
    """The AttentionOp for FILE with `--set` parameters (and `extra` options)."""
    from ..api import compile as compile_
    params = parse_sets(args.sets)
    return compile_(program(args), backend=backend or getattr(args, "backend", "auto"), **params, **extra)


DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16"}


def dtype(args):
    import torch
    return getattr(torch, DTYPES[args.dtype])


def device(args, need: bool = True):
    """The torch device of `--device`; `need` checks it exists here (timing and running need it)."""
    import torch
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise PatternError(f"unknown device '{args.device}'", hint="use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise PatternError(f"unknown device '{args.device}'", hint="use cpu or cuda")
    if need and dev.type == "cuda" and not torch.cuda.is_available():
        raise PatternError("--device cuda, but this machine has no CUDA GPU", hint="use --device cpu")
    return dev


def _int_at_least(text: str, low: int, what: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1, "a positive int")


def non_negative(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0, "an int >= 0")


def sizes(text: str) -> list[int]:
    """argparse type: '1024,2048,4096' as a list of positive ints."""
    return [positive(x) for x in text.split(",") if x.strip()]


def cache_dir(*parts: str) -> str:
    """A directory under the user's cache (`$XDG_CACHE_HOME`, else `~/.cache`; `%LOCALAPPDATA%` on Windows):
    where commands write by default, so they never litter the current directory or a git work tree.

    >>> cache_dir("demo").endswith(os.path.join("patterndsl", "demo"))
    True
    """
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return os.path.join(base or os.path.join(os.path.expanduser("~"), ".cache"), "patterndsl", *parts)


def note_without_triton(what: str) -> None:
    """Tell the user (on stderr) that `what` needs the optional triton package to run, when it is missing."""
    from ..api import require_triton
    try:
        require_triton()
    except PatternError as e:
        print(f"note: {what} runs only with triton installed ({e.hint.split(' (')[0]})", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ errors
def guarded(run):
    """Wrap a subcommand's `run(args) -> int`: PatternErrors print their rendering and exit 1, a file that
    cannot be written exits 1 with its path and reason, Ctrl-C exits 130, never a traceback."""
    @functools.wraps(run)
    def wrapper(args) -> int:
        try:
            return run(args)
        except PatternError as e:
            print(str(e), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `patterndsl emit x | head`
            return 0
        except OSError as e:     # an output path that cannot be written
            where = f" {e.filename}" if e.filename else ""
            print(f"error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
            return 1
    return wrapper
