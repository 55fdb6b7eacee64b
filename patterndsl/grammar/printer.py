"""The printer: AST back to canonical `.attn` text, so that `parse(print(parse(x))) == parse(x)`.

>>> from patterndsl.grammar.parser import parse_module
>>> print(print_module(parse_module("pattern p(w:int=2){attend softmax over (sliding(w)|causal)&~full}")), end="")
pattern p(w: int = 2) {
    attend softmax over (sliding(w) | causal) & ~full
}
"""
from __future__ import annotations

from . import ast

# binding power of each operator, lowest first (mirrors attn.lark)
_PREC = {"if": 0, "or": 1, "and": 2, "not": 3, "cmp": 4, "|": 5, "&": 6, "+": 7, "-": 7,
         "*": 8, "/": 8, "//": 8, "%": 8, "unary": 9}
_CMPS = ("<", "<=", ">", ">=", "==", "!=")


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.IfExpr):
        return _PREC["if"]
    if isinstance(e, ast.BinOp):
        return _PREC["cmp"] if e.op in _CMPS else _PREC[e.op]
    if isinstance(e, ast.UnaryOp):
        return _PREC["not"] if e.op == "not" else _PREC["unary"]
    return 10


def _wrap(e: ast.Expr, need: int) -> str:
    text = print_expr(e)
    return f"({text})" if _prec(e) < need else text


def _num(v) -> str:
    if isinstance(v, float):
        r = repr(v)
        return r if ("." in r or "e" in r or "inf" in r or "nan" in r) else r + ".0"
    return str(v)


def print_expr(e: ast.Expr) -> str:
    """One expression as text, with the fewest parentheses that keep its tree."""
    if isinstance(e, ast.Num):
        return _num(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Str):
        return '"' + e.value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.SetLit):
        return "{" + ", ".join(print_expr(x) for x in e.items) + "}"
    if isinstance(e, ast.Call):
        args = [print_expr(a) for a in e.args] + [f"{k.name} = {print_expr(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, ast.UnaryOp):
        if e.op == "not":
            return f"not {_wrap(e.operand, _PREC['not'])}"
        return f"{e.op}{_wrap(e.operand, _PREC['unary'])}"
    if isinstance(e, ast.BinOp):
        p = _prec(e)
        if e.op in _CMPS:  # non-associative: both sides bind tighter
            return f"{_wrap(e.left, p + 1)} {e.op} {_wrap(e.right, p + 1)}"
        return f"{_wrap(e.left, p)} {e.op} {_wrap(e.right, p + 1)}"
    if isinstance(e, ast.IfExpr):
        return f"if {print_expr(e.cond)} then {print_expr(e.then)} else {_wrap(e.other, 0)}"
    raise TypeError(f"not an expression: {e!r}")


def print_attend(a: ast.Attend) -> str:
    out = []
    if a.heads is not None:
        out.append(f"heads[{print_expr(a.heads.start)}:{print_expr(a.heads.stop)}]")
    out.append(f"attend {_wrap(a.normaliser, 1)}")  # an `if` normaliser needs parentheses
    if a.query is not None:
        out.append(f"query {a.query.id}")
    if a.keys is not None:
        out.append(f"keys {a.keys.id}")
    if a.mask is not None:
        out.append(f"over {print_expr(a.mask)}")  # `over if ...` parses as is: no extra nesting level
    text = " ".join(out)
    return text + "".join(f", {o.name} = {print_expr(o.value)}" for o in a.options)


def print_stmt(s: ast.Stmt) -> str:
    if isinstance(s, ast.Attend):
        return print_attend(s)
    if isinstance(s, ast.Let):
        value = print_attend(s.value) if isinstance(s.value, ast.Attend) else print_expr(s.value)
        return f"{s.name} = {value}"
    if isinstance(s, ast.TensorParam):
        width = f", {print_expr(s.width)}" if s.width is not None else ""
        return f"param {s.name}[{print_expr(s.length)}{width}]"
    if isinstance(s, ast.Return):
        return "return " + ", ".join(n.id for n in s.names)
    raise TypeError(f"not a statement: {s!r}")


def print_param(x: ast.Param) -> str:
    """`name: type [in {choices}] [= default]`."""
    choices = f" in {{{', '.join(print_expr(c) for c in x.choices)}}}" if x.choices else ""
    return f"{x.name}: {x.type}{choices}" + (f" = {print_expr(x.default)}" if x.default is not None else "")


def print_pattern(p: ast.Pattern) -> str:
    params = ", ".join(print_param(x) for x in p.params)
    body = "".join(f"    {print_stmt(s)}\n" for s in p.body)
    return f"pattern {p.name}({params}) {{\n{body}}}\n"


def print_module(m: ast.Module) -> str:
    """Canonical text of every pattern, separated by blank lines."""
    return "\n".join(print_pattern(p) for p in m.patterns)
