"""Compile-time values of `.attn` expressions and the built-in functions that build them.

`evaluate(expr, env)` turns a checked AST expression into a Python value: int, float, bool, str, frozenset
(set), a `Mask`, a feature map, a normaliser, or (inside `where`) a predicate. Every value error (negative
window, dilation < 1, division by zero, ...) is a PatternError at the offending argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import PatternError, Span
from ..grammar import ast
from ..grammar.limits import FEATURE_LIMIT, INT_LIMIT as _LIMIT
from ..grammar.signatures import CONSTANTS, SIGNATURES
from . import mask as M
from . import predicate as P
from . import scores as S
from .scores.build import score_binary, score_call, score_unary
from .program import Elu1, Favor, Linear, Nested, ReluFeatures, Softmax

_SET_LIMIT = 1 << 24  # most elements a set may hold


@dataclass
class Env:
    """Names visible to an expression: parameter values, `NAME = expr` values, tensor params, and whether
    we are inside `where(...)` (where `i`, `j` are index variables)."""
    values: dict = field(default_factory=dict)
    tensors: set = field(default_factory=set)
    in_where: bool = False
    in_score: bool = False                       # inside `, bias = ...`: i, j, h are score variables
    tables: dict = field(default_factory=dict)   # bias tables: name -> (heads, width)


def type_name(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, frozenset):
        return "set"
    if isinstance(v, M.Mask):
        return "mask"
    if isinstance(v, (Favor, ReluFeatures, Elu1)):
        return "featuremap"
    if isinstance(v, (Softmax, Linear, Nested)):
        return "normaliser"
    if isinstance(v, (P.Var, P.Bin, P.Call)):
        return "int"  # an index expression inside where
    if isinstance(v, (P.Cmp, P.Logic)):
        return "bool"
    if isinstance(v, S.Term):
        return "float"   # a bias: a float per (i, j, h)
    return type(v).__name__


def _err(msg: str, span: Span, hint: str | None = None) -> PatternError:
    return PatternError(msg, span, hint=hint)


def expect(v, want: str, span: Span, what: str):
    """Check `v` has type `want` (int is accepted for float); return it (converted for float)."""
    got = type_name(v)
    if want == "float" and got == "int":
        return float(v)
    if got != want:
        raise _err(f"{what} must be {_article(want)}, got {got}", span)
    return v


def _article(t: str) -> str:
    return ("an " if t[0] in "aeiou" else "a ") + t


def evaluate(e: ast.Expr, env: Env):
    if isinstance(e, (ast.Num, ast.Bool, ast.Str)):
        return e.value
    if isinstance(e, ast.SetLit):
        items = [expect(evaluate(x, env), "int", x.span, "a set element") for x in e.items]
        return frozenset(_index(x, it.span) for x, it in zip(items, e.items))
    if isinstance(e, ast.Name):
        return _name(e, env)
    if isinstance(e, ast.IfExpr):
        cond = evaluate(e.cond, env)
        if not isinstance(cond, bool):
            raise _err(f"the condition of `if` must be a compile-time bool, got {type_name(cond)}", e.cond.span)
        return evaluate(e.then if cond else e.other, env)
    if isinstance(e, ast.UnaryOp):
        return _unary(e, evaluate(e.operand, env))
    if isinstance(e, ast.BinOp):
        return _binary(e, evaluate(e.left, env), evaluate(e.right, env))
    if isinstance(e, ast.Call):
        return _call(e, env)
    raise _err(f"unexpected expression {type(e).__name__}", getattr(e, "span", Span(1, 1)))


def _name(e: ast.Name, env: Env):
    if env.in_where and e.id in ("i", "j") and e.id not in env.values:
        return P.Var(e.id)
    if env.in_score and e.id in S.VARS and e.id not in env.values:
        return S.Var(e.id)
    if e.id in env.values:
        return env.values[e.id]
    if e.id in CONSTANTS:
        return {"full": M.FULL, "causal": M.CAUSAL, "empty": M.EMPTY, "softmax": Softmax(),
                "elu1": Elu1()}[e.id]
    raise _err(f"unknown name '{e.id}'", e.span)


def _index(v: int, span: Span) -> int:
    if v < 0:
        raise _err(f"token index {v} is negative", span, hint="token indices count from 0")
    if v >= _LIMIT:
        raise _err(f"token index {v} is too large", span)
    return v


def _is_pred(v) -> bool:
    return isinstance(v, (P.Var, P.Const, P.Bin, P.Call, P.Cmp, P.Logic))


def _as_pred(v, span: Span):
    if _is_pred(v):
        return v
    if isinstance(v, (bool, int)):
        return P.Const(v)
    raise _err(f"{type_name(v)} cannot be used inside where(...)", span)


def _unary(e: ast.UnaryOp, v):
    if isinstance(v, S.Term):
        return score_unary(e, v)
    if e.op == "~":
        return M.complement(expect(v, "mask", e.operand.span, "the operand of `~`"))
    if e.op == "not":
        if _is_pred(v):
            return P.Logic("not", v)
        return not expect(v, "bool", e.operand.span, "the operand of `not`")
    if _is_pred(v):
        return P.Bin("-", P.Const(0), v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(f"cannot negate {type_name(v)}", e.operand.span)
    return -v


_CMP = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _binary(e: ast.BinOp, a, b):
    op = e.op
    if isinstance(a, S.Term) or isinstance(b, S.Term):
        return score_binary(e, a, b)
    if _is_pred(a) or _is_pred(b):
        return _binary_pred(e, a, b)
    if isinstance(a, M.Mask) or isinstance(b, M.Mask):
        a = expect(a, "mask", e.left.span, f"the left operand of `{op}`")
        b = expect(b, "mask", e.right.span, f"the right operand of `{op}`")
        if op in ("|", "&", "-"):
            return {"|": M.union, "&": M.inter, "-": M.difference}[op](a, b)
        raise _err(f"`{op}` does not apply to masks", e.span, hint="masks combine with | & - ~")
    if isinstance(a, frozenset) or isinstance(b, frozenset):
        a = expect(a, "set", e.left.span, f"the left operand of `{op}`")
        b = expect(b, "set", e.right.span, f"the right operand of `{op}`")
        if op in ("|", "&", "-"):
            return {"|": a | b, "&": a & b, "-": a - b}[op]
        if op in ("==", "!="):
            return _CMP[op](a, b)
        raise _err(f"`{op}` does not apply to sets", e.span, hint="sets combine with | & -")
    if op in ("and", "or"):
        a = expect(a, "bool", e.left.span, f"the left operand of `{op}`")
        b = expect(b, "bool", e.right.span, f"the right operand of `{op}`")
        return (a and b) if op == "and" else (a or b)
    if op in _CMP:
        if op in ("==", "!=") and type_name(a) == type_name(b):
            return _CMP[op](a, b)
        _number(a, e.left.span, op)
        _number(b, e.right.span, op)
        return _CMP[op](a, b)
    _number(a, e.left.span, op)
    _number(b, e.right.span, op)
    if op in ("//", "%", "/") and b == 0:
        raise _err("division by zero", e.right.span)
    if op in ("|", "&"):
        raise _err(f"`{op}` combines masks or sets, not numbers", e.span)
    if op == "/":
        return a / b
    r = {"+": a + b, "-": a - b, "*": a * b}[op] if op in ("+", "-", "*") else (a // b if op == "//" else a % b)
    if isinstance(r, int) and abs(r) >= _LIMIT:
        raise _err(f"value {r} is too large", e.span)
    if isinstance(r, float) and not math.isfinite(r):
        raise _err("value is not finite", e.span)
    return r


def _number(v, span, op):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(f"`{op}` needs numbers, got {type_name(v)}", span)


def _binary_pred(e: ast.BinOp, a, b):
    a, b = _as_pred(a, e.left.span), _as_pred(b, e.right.span)
    if e.op in ("+", "-", "*", "//", "%"):
        return P.Bin(e.op, a, b)
    if e.op in _CMP:
        return P.Cmp(e.op, a, b)
    if e.op in ("and", "or"):
        return P.Logic(e.op, a, b)
    raise _err(f"`{e.op}` cannot be used inside where(...)", e.span,
               hint="where takes + - * // % abs min max, comparisons, and, or, not")


# ------------------------------------------------------------------------------------------------- calls
def _bind_args(e: ast.Call) -> dict:
    """Arguments by name (the checker has matched them against the signature)."""
    bound = dict(zip((a.name for a in SIGNATURES[e.func].args), e.args))
    bound.update((kw.name, kw.value) for kw in e.kwargs)
    return bound


def _call(e: ast.Call, env: Env):
    sig = SIGNATURES[e.func]
    bound = _bind_args(e)
    if e.func == "where":
        inner = Env(env.values, env.tensors, in_where=True)
        pred = evaluate(bound["predicate"], inner)
        if isinstance(pred, bool):
            return M.FULL if pred else M.EMPTY
        if not isinstance(pred, (P.Cmp, P.Logic)):
            raise _err("where(...) needs a condition (a comparison or and/or/not)", bound["predicate"].span)
        return M.Where(pred)
    if e.func in S.SCORE_CALLS or (env.in_score and e.func in S.FUNCS):
        return score_call(e, bound, env, lambda x: evaluate(x, env))
    if e.func in ("same", "nested"):   # the checker has made sure the argument is a name
        arg = bound[sig.args[0].name]
        return M.Same(arg.id) if e.func == "same" else Nested(arg.id)
    vals, spans = {}, {}
    for a in sig.args:
        if a.name in bound:
            vals[a.name], spans[a.name] = evaluate(bound[a.name], env), bound[a.name].span
        else:
            vals[a.name], spans[a.name] = a.default, e.span
    if env.in_where and any(_is_pred(v) for v in vals.values()):
        if e.func not in ("abs", "min", "max"):
            raise _err(f"{e.func}(...) cannot be used inside where(...)", e.span,
                       hint="where takes + - * // % abs min max, comparisons, and, or, not")
        return P.Call(e.func, tuple(_as_pred(vals[a.name], spans[a.name]) for a in sig.args))
    for a in sig.args:
        vals[a.name] = expect(vals[a.name], a.type, spans[a.name], f"argument '{a.name}' of {e.func}")
    if e.func in M.BUILDERS:
        return _build_mask(M.BUILDERS[e.func], sig, vals, spans)
    return _BUILD[e.func](vals, spans)


def _build_mask(builder, sig, vals, spans):
    """A mask primitive from checked values: its `Builder` says which bounds and index sets to check."""
    for name, (low, what) in builder.at_least.items():
        _at_least(vals, spans, name, low, what)
    for name in builder.indices:
        vals[name] = _indices(vals, spans, name)
    return builder.make(*(vals[a.name] for a in sig.args))


def _at_least(vals, spans, name, low, what=None):
    if vals[name] < low:
        raise _err(f"{what or name} must be >= {low}, got {vals[name]}", spans[name])
    if isinstance(vals[name], int) and vals[name] >= _LIMIT:
        raise _err(f"{what or name} {vals[name]} is too large", spans[name])
    return vals[name]


def _indices(vals, spans, name):
    return frozenset(_index(x, spans[name]) for x in vals[name])


def _range(v, s):
    a, b = v["start"], v["stop"]
    _at_least(v, s, "start", 0)
    if b < a:
        raise _err(f"range stop {b} is below its start {a}", s["stop"])
    if b - a > _SET_LIMIT:
        raise _err(f"range of {b - a} tokens is too large (limit {_SET_LIMIT})", s["stop"])
    return frozenset(range(a, b))


def _features(v, s) -> int:
    n = _at_least(v, s, "features", 1)
    if n > FEATURE_LIMIT:
        raise _err(f"features = {n} is too many (at most {FEATURE_LIMIT})", s["features"],
                   hint="the projection holds features x head-dim numbers per head; FAVOR+ uses a few hundred")
    return n


def _favor(v, s):
    _features(v, s)
    if v["scaling"] not in (0, 1):
        raise _err(f"scaling must be 0 (chi norms) or 1 (sqrt(d)), got {v['scaling']}", s["scaling"])
    if not v["eps"] > 0:
        raise _err(f"eps must be > 0, got {v['eps']}", s["eps"])
    return Favor(v["features"], v["orthogonal"], v["scaling"], float(v["eps"]), _at_least(v, s, "seed", 0),
                 _at_least(v, s, "redraw", 0))


_BUILD = {
    "range": _range,
    "abs": lambda v, s: abs(v["x"]),
    "min": lambda v, s: min(v["a"], v["b"]),
    "max": lambda v, s: max(v["a"], v["b"]),
    "favor": _favor,
    "relu": lambda v, s: ReluFeatures(_features(v, s), v["orthogonal"],
                                      _at_least(v, s, "seed", 0), _at_least(v, s, "redraw", 0)),
    "elu1": lambda v, s: Elu1(),
    "softmax": lambda v, s: Softmax(),
    "linear": lambda v, s: Linear(v["phi"]),
}
