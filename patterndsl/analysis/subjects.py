"""What the analyses accept: masks, programs (anything `pd.compile` takes), compiled ops, or IR, as a
`ProgramIR` or a bare `Mask`; and mask expressions written as `.attn` text (`"sliding(2) | causal"`).

>>> mask_expr("sliding(1) | sliding(2)")
Band(lo=-2, hi=2, step=1)
>>> subject("window(3, 0)")
Band(lo=0, hi=3, step=1)
>>> subject("longformer").name
'longformer'
"""
from __future__ import annotations

import os

from ..errors import PatternError, Source, Span
from ..ir import mask as M
from ..ir.program import ProgramIR

_HEAD = "pattern mask() {\n    attend softmax over\n"


def mask_expr(text: str) -> M.Mask:
    """A mask from `.attn` mask syntax (the text after `over`); errors point into `text`."""
    from ..api import parse
    try:
        prog = parse(_HEAD + text + "\n}\n", "<mask>")
        ir = prog.lower()
    except PatternError as e:
        raise _relocated(e, text) from None
    return ir.stages[0].mask


def _relocated(e: PatternError, text: str) -> PatternError:
    """The error moved from the wrapped pattern into the mask text itself (line 3 of the wrapper is line 1)."""
    last = 3 + text.count("\n")
    if e.span is not None and e.span.line > last:          # the wrapper's closing brace: the text ended early
        lines = text.split("\n")
        end = Span(len(lines), len(lines[-1]) + 1)
        return PatternError("the mask expression ends too early", end, Source(text, "<mask>"), e.hint)
    if e.span is None or e.span.line < 3:
        return PatternError(e.message, None, Source(text, "<mask>"), e.hint)
    s = e.span
    end = None if s.end_line is None else s.end_line - 2
    return PatternError(e.message, Span(s.line - 2, s.column, end, s.end_column), Source(text, "<mask>"), e.hint)


def _looks_like_program(text: str) -> bool:
    return "{" in text and "pattern" in text


def subject(x, params: dict | None = None):
    """`x` as a `ProgramIR` (programs, ops, built-in names, paths, `.attn` text) or a `Mask` (masks and mask
    expressions). `params` override a program's parameters."""
    from ..api import Program, builtins, resolve
    from ..op import AttentionOp
    params = params or {}
    if isinstance(x, M.Mask):
        return _no_params(x, params)
    if isinstance(x, ProgramIR):
        return _no_params(x, params)
    if isinstance(x, AttentionOp):
        return _no_params(x.ir, params)
    if isinstance(x, Program):
        return x.lower(**params)
    if isinstance(x, os.PathLike):
        return resolve(x).lower(**params)
    if not isinstance(x, str):
        raise PatternError(f"expected a mask, a program, an op, a built-in name, .attn text or a path, "
                           f"got {type(x).__name__}")
    if _looks_like_program(x) or x in builtins() or x.endswith(".attn") or os.path.exists(x):
        if x.endswith(".attn") and not os.path.exists(x):
            raise PatternError(f"no such file: {x}")
        return resolve(x).lower(**params)
    return _no_params(mask_expr(x), params)


def _no_params(x, params: dict):
    if params:
        raise PatternError(f"parameters {', '.join(sorted(params))} given for a value that takes none",
                           hint="parameters apply to programs (a built-in name, a path or .attn text)")
    return x


def rows_of(ir: ProgramIR, src: str) -> str:
    """What the rows of a tensor are: `input` (token positions) or the param whose rows a stage keeps."""
    while src != "input" and src not in dict(ir.params):
        src = ir.stage(src).query
    return src


def describe(x) -> str:
    """A short label: the mask's source text or the program's name."""
    return M.to_source(x) if isinstance(x, M.Mask) else x.name
