"""Public entry points: parse, load, builtin, builtins, compile.

Inner layers (grammar, checks, lowering) raise precise PatternErrors with a span; these entry points add the
context once, here (the source text, and the parameters given at compile time), and re-raise `from None`.

>>> import patterndsl as pd
>>> prog = pd.parse("pattern local(w: int = 2) { attend softmax over sliding(w) }")
>>> prog.name, prog.lower(w=1).stages[0].mask
('local', Band(lo=-1, hi=1, step=1))
>>> "longformer" in pd.builtins()
True
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from .errors import PatternError, Source, did_you_mean
from .grammar import ast
from .ir.lower import lower
from .ir.program import ProgramIR


class Program:
    """A parsed, checked `.attn` pattern: the *what*. `lower(**params)` gives its IR for parameter values."""

    def __init__(self, pattern: ast.Pattern, source: Source, module: ast.Module | None = None):
        self.pattern = pattern
        self.source = source
        self.module = module

    @property
    def name(self) -> str:
        return self.pattern.name

    @property
    def params(self) -> dict[str, ast.Param]:
        return {p.name: p for p in self.pattern.params}

    def lower(self, **params) -> ProgramIR:
        """The IR for these parameter values (defaults for the rest); errors point into the source and name
        the parameters given."""
        try:
            return lower(self.pattern, params)
        except PatternError as e:
            raise _in_context(e, self.source, params) from None

    def signature(self) -> str:
        from .grammar.printer import print_param
        return f"pattern {self.name}({', '.join(print_param(p) for p in self.pattern.params)})"

    def to_source(self) -> str:
        """Canonical `.attn` text of this pattern."""
        from .grammar.printer import print_module
        return print_module(ast.Module((self.pattern,)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Program) and self.pattern == other.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"<Program {self.signature()} from {self.source.name}>"


def _in_context(e: PatternError, source: Source, params: dict | None = None) -> PatternError:
    """`e` with the user's input attached: the source it points into, and the compile-time parameters that
    gave the values behind its caret unless it names one already (added here once, never by inner layers)."""
    hint = e.hint
    if params and not any(f"parameter '{k}'" in e.message for k in params):
        given = ", ".join(f"{k}={_show(v)}" for k, v in params.items())
        hint = (f"{hint}; " if hint else "") + f"with the parameters given at compile time: {given}"
    return PatternError(e.message, e.span, e.source or source, hint)


def _show(v) -> str:
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(map(str, sorted(v))) + "}"
    return f'"{v}"' if isinstance(v, str) else repr(v)


@functools.lru_cache(maxsize=256)
def _parse_cached(text: str, name: str) -> tuple[Program, ...]:
    from .grammar import check_module, parse_module
    source = Source(text, name)
    try:
        module = parse_module(text, name)
        check_module(module)
        programs = tuple(Program(p, source, module) for p in module.patterns)
        for prog in programs:  # value checks with the defaults: a checked program lowers
            if all(prm.default is not None for prm in prog.pattern.params):
                lower(prog.pattern, {})
    except PatternError as e:
        raise _in_context(e, source) from None
    except RecursionError:  # the one catch, at the public entry: the nesting limits keep passes far from it
        raise PatternError("program nested too deeply", source=source) from None
    return programs


def parse_all(text: str, name: str = "<string>") -> tuple[Program, ...]:
    """Every pattern of a `.attn` text, checked (and lowered once with default parameters)."""
    if not isinstance(text, str):
        raise PatternError(f"parse takes the program text as str, got {type(text).__name__}")
    return _parse_cached(text, name)


def _one(programs: tuple[Program, ...], pattern: str | None, where: str) -> Program:
    if pattern is None:
        if len(programs) != 1:
            names = ", ".join(p.name for p in programs)
            raise PatternError(f"{where} holds {len(programs)} patterns ({names})",
                               hint="choose one with pattern=NAME")
        return programs[0]
    for p in programs:
        if p.name == pattern:
            return p
    names = [p.name for p in programs]
    raise PatternError(f"no pattern '{pattern}' in {where}",
                       hint=did_you_mean(pattern, names) or f"it holds: {', '.join(names)}")


def parse(text: str, name: str = "<string>", pattern: str | None = None) -> Program:
    """Parse and check `.attn` text holding one pattern (or pick one with `pattern=`)."""
    return _one(parse_all(text, name), pattern, name)


def _read(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PatternError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PatternError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def load(path: str | os.PathLike, pattern: str | None = None) -> Program:
    """Parse and check a `.attn` file holding one pattern (or pick one with `pattern=`)."""
    path = Path(path)
    return parse(_read(path), str(path), pattern)


def load_all(path: str | os.PathLike) -> tuple[Program, ...]:
    """Every pattern of a `.attn` file, checked."""
    path = Path(path)
    return parse_all(_read(path), str(path))


def builtins() -> list[str]:
    """Names of the built-in programs."""
    from .library import builtin_names
    return builtin_names()


def builtin(name: str) -> Program:
    """A built-in program by name (`pd.builtins()` lists them)."""
    from .library import builtin_path
    path = builtin_path(name)
    return parse(path.read_text(encoding="utf-8"), f"builtin:{path.name}", pattern=name)


def resolve(program) -> Program:
    """A Program from a Program, a built-in name, `.attn` text, or a path."""
    if isinstance(program, Program):
        return program
    if isinstance(program, os.PathLike):
        return load(program)
    if isinstance(program, str):
        if "{" in program:
            return parse(program)
        if program.endswith(".attn") or os.sep in program:
            return load(program)
        if program in builtins():
            return builtin(program)
        raise PatternError(f"'{program}' is not a built-in program or a .attn file",
                           hint=did_you_mean(program, builtins()) or f"built-ins: {', '.join(builtins())}")
    raise PatternError(f"expected a Program, a built-in name, .attn text or a path, got {type(program).__name__}")


def require_triton() -> None:
    """A PatternError unless the optional `triton` package can be imported (it is not imported here)."""
    import importlib.util
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise PatternError("the Triton backend needs the triton package, which is not installed",
                           hint="pip install 'patterndsl[triton]' (CUDA builds of torch include it), "
                                "or use backend='torch' or 'auto'")


def compile(program, backend: str = "auto", **params):
    """Compile a program to an `AttentionOp`; keyword parameters override the pattern's defaults.

    `program`: a Program, a built-in name, `.attn` text, or a path. `backend`: "auto" (triton on CUDA, the
    block-sparse torch backend on the CPU), "reference", "torch" or "triton". Options that are not pattern
    parameters: `projection=` (a [features, head_dim] tensor, or a dict stage -> tensor, for random-feature
    stages). Errors name the bad parameter and point into the source.
    """
    from .op import AttentionOp, OP_OPTIONS
    if backend == "triton":
        require_triton()
    prog = resolve(program)
    options = {k: params.pop(k) for k in list(params) if k in OP_OPTIONS}
    return AttentionOp(prog, prog.lower(**params), backend=backend, **options)
