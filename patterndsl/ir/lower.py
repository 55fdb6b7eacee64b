"""Lowering: a checked AST pattern plus parameter values becomes a `ProgramIR` (then verified).

Passes, in order: `bind_params` (defaults, overrides, type checks naming the parameter), `lower_body`
(evaluate values and stages, fold `causal = true` into masks), `schedule` (topological order, dead stages
dropped), and `verify`.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import PatternError, Span, did_you_mean
from ..grammar import ast
from ..grammar.limits import check_param, check_ranges
from . import mask as M
from .program import INPUT, Linear, Nested, ProgramIR, Softmax, Stage
from .values import Env, evaluate, expect, type_name
from .scores.lower import bias_table, score_option, stage_score
from .verify import verify


def lower(pattern: ast.Pattern, overrides: dict | None = None) -> ProgramIR:
    """Lower `pattern` with parameters `overrides` (the rest take their defaults)."""
    values = bind_params(pattern, overrides or {})
    prog = lower_body(pattern, values)   # the public entry (api.Program.lower) names the parameters given
    verify(prog)
    return prog


# ---------------------------------------------------------------------------------------------- parameters
def _convert(value, want: str):
    """A Python value given at compile time as the parameter type, or None if it does not fit."""
    if want == "bool":
        return value if isinstance(value, bool) else None
    if want == "int":
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return int(value)
        if hasattr(value, "__index__") and not isinstance(value, float):
            return int(value.__index__())
        return None
    if want == "float":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if want == "str":
        return value if isinstance(value, str) else None
    if want == "set":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            return None
        items = list(value)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in items):
            return None
        return frozenset(items)
    return None


def bind_params(pattern: ast.Pattern, overrides: dict) -> dict:
    """Parameter values: defaults, overridden by compile-time keywords (type-checked, errors name them)."""
    declared = {p.name: p for p in pattern.params}
    for name in overrides:
        if name not in declared:
            hint = did_you_mean(name, declared) or (
                f"{pattern.name} takes: {', '.join(declared)}" if declared else f"{pattern.name} takes no parameters")
            raise PatternError(f"unknown parameter '{name}' for pattern {pattern.name}", pattern.span, hint=hint)
    values: dict = {}
    for p in pattern.params:
        if p.name in overrides:
            got = overrides[p.name]
            v = _convert(got, p.type)
            if v is None and p.type == "set" and isinstance(got, (set, frozenset, list, tuple, range)):
                bad = next(x for x in got if not (isinstance(x, int) and not isinstance(x, bool) and x >= 0))
                raise PatternError(f"parameter '{p.name}' holds token indices (ints >= 0), got {bad!r}", p.span)
            if v is None:
                shown = repr(got) if len(repr(got)) < 60 else repr(got)[:57] + "..."
                hint = "a set is a collection of token indices >= 0, e.g. {0, 5}" if p.type == "set" else None
                raise PatternError(f"parameter '{p.name}' expects {p.type}, got {type(got).__name__} {shown}",
                                   p.span, hint=hint)
            check_param(p.name, p.type, v, p.span)
        elif p.default is not None:
            v = expect(evaluate(p.default, Env(dict(values))), p.type, p.default.span,
                       f"the default of parameter '{p.name}'")
        else:
            raise PatternError(f"parameter '{p.name}' of pattern {pattern.name} has no default and was not given",
                               p.span, hint=f"pass {p.name}=... to pd.compile")
        if p.choices:
            _check_choice(p, v, values)
        values[p.name] = v
    return values


def _check_choice(p: ast.Param, value, earlier: dict) -> None:
    """A parameter declared `name: type in {a, b}` takes one of those values."""
    allowed = [expect(evaluate(c, Env(dict(earlier))), p.type, c.span, f"a choice of parameter '{p.name}'")
               for c in p.choices]
    if value not in allowed:
        shown = ", ".join(_show(a) for a in allowed)
        raise PatternError(f"parameter '{p.name}' must be one of {shown}, got {_show(value)}", p.span,
                           hint=did_you_mean(value, [a for a in allowed if isinstance(a, str)])
                           if isinstance(value, str) else None)


def _show(v) -> str:
    if isinstance(v, frozenset):
        return "{" + ", ".join(map(str, sorted(v))) + "}"
    return f'"{v}"' if isinstance(v, str) else repr(v)


# ---------------------------------------------------------------------------------------------------- body
def lower_body(pattern: ast.Pattern, params: dict) -> ProgramIR:
    env = Env(dict(params))
    stages: dict[str, Stage] = {}
    spans: dict[str, Span] = {}
    tensor_params: list[tuple[str, int]] = []
    anonymous: list[str] = []
    returned: tuple[str, ...] | None = None
    order: list[str] = []

    for k, st in enumerate(pattern.body):
        if isinstance(st, ast.TensorParam) and st.width is not None:
            env.tables[st.name] = bias_table(st, env)
        elif isinstance(st, ast.TensorParam):
            length = expect(evaluate(st.length, env), "int", st.length.span, f"the length of param '{st.name}'")
            if length < 1:
                raise PatternError(f"param '{st.name}' must have at least 1 row, got {length}", st.length.span)
            tensor_params.append((st.name, length))
            env.tensors.add(st.name)
        elif isinstance(st, ast.Let) and not isinstance(st.value, ast.Attend):
            value = evaluate(st.value, env)
            check_ranges((st.value,), env.values, lambda e: evaluate(e, env))   # values fit what backends compute
            env.values[st.name] = value
        elif isinstance(st, (ast.Let, ast.Attend)):
            att = st.value if isinstance(st, ast.Let) else st
            name = st.name if isinstance(st, ast.Let) else f"_{k}"
            stages[name] = _stage(name, att, env)
            check_ranges((att.normaliser, att.mask), env.values, lambda e: evaluate(e, env))
            spans[name] = att.span
            order.append(name)
            if isinstance(st, ast.Attend):
                anonymous.append(name)
        elif isinstance(st, ast.Return):
            returned = tuple(n.id for n in st.names)

    by_heads = any(stages[n].heads for n in anonymous)
    if returned is not None:
        outputs = returned
    elif anonymous:
        outputs = tuple(anonymous)
    else:
        outputs = (order[-1],)
    if by_heads:
        outputs = _check_heads([stages[n] for n in anonymous], [spans[n] for n in anonymous])
    bindings = tuple((k, sorted(v) if isinstance(v, frozenset) else v) for k, v in params.items())
    prog = schedule(pattern.name, stages, outputs, tuple(tensor_params), by_heads, bindings, spans)
    read = {t for s in prog.stages if s.score is not None for t in s.score.tables()}
    return replace(prog, tables=tuple((n, *hw) for n, hw in env.tables.items() if n in read))


def _stage(name: str, att: ast.Attend, env: Env) -> Stage:
    norm = expect(evaluate(att.normaliser, env), "normaliser", att.normaliser.span, "the normaliser")
    mask = M.FULL if att.mask is None else expect(evaluate(att.mask, env), "mask", att.mask.span, "`over`")
    over_span = att.mask.span if att.mask is not None else att.span
    terms: dict = {}
    causal = False
    for opt in att.options:
        if opt.name in ("bias", "softcap", "far"):
            terms[opt.name] = score_option(opt, env, evaluate)
            continue
        v = evaluate(opt.value, env)
        if opt.name == "causal":
            if expect(v, "bool", opt.value.span, "the option causal"):
                mask, causal = M.inter(mask, M.CAUSAL), True
        elif opt.name == "scale":
            v = expect(v, "float", opt.value.span, "the option scale")
            if not isinstance(norm, Softmax):
                raise PatternError("scale applies to softmax attention only", opt.span)
            if not v > 0:
                raise PatternError(f"scale must be > 0, got {v}", opt.value.span)
            norm = Softmax(scale=float(v))
        else:
            raise PatternError(f"unknown option '{opt.name}'", opt.span)
    if isinstance(norm, Linear) and mask not in (M.FULL, M.CAUSAL):
        raise PatternError(f"linear attention runs over `full` or `causal` only, got {M.to_source(mask)}",
                           over_span, hint="mix an exact local window with linear attention by giving each "
                                           "its heads: heads[a:b] attend ...")
    if isinstance(norm, Nested):
        if mask != M.CAUSAL:
            raise PatternError("nested(...) is causal Luna: write `, causal = true` and no other mask", att.span,
                               hint="bidirectional Luna is two softmax stages: see the built-in `luna`")
        if norm.packed not in env.tensors:
            raise PatternError(f"nested(...) needs a tensor param, '{norm.packed}' is not one", att.normaliser.span,
                               hint=f"declare it first: param {norm.packed}[16]")
    for src in (att.query, att.keys):
        if src is not None and src.id in env.values:
            raise PatternError(f"'{src.id}' is a value ({type_name(env.values[src.id])}), not a stage or input",
                               src.span)
    heads = None
    if att.heads is not None:
        a = expect(evaluate(att.heads.start, env), "int", att.heads.start.span, "the first head")
        b = expect(evaluate(att.heads.stop, env), "int", att.heads.stop.span, "the head range's end")
        if a < 0:
            raise PatternError(f"head index {a} is negative", att.heads.start.span)
        if b <= a:
            raise PatternError(f"head range heads[{a}:{b}] is empty", att.heads.span,
                               hint="heads[a:b] takes heads a .. b-1, so b must exceed a")
        heads = (a, b)
    score = stage_score(terms, att, norm, mask, causal) if terms else None
    return Stage(name, norm, mask, att.query.id if att.query else INPUT, att.keys.id if att.keys else INPUT, heads,
                 score)


def _check_heads(stages: list[Stage], spans: list[Span]) -> tuple[str, ...]:
    ranked = sorted(zip(stages, spans), key=lambda t: t[0].heads)
    expected = 0
    for st, span in ranked:
        a, b = st.heads
        if a < expected:
            raise PatternError(f"heads[{a}:{b}] overlaps another stage's heads (heads below {expected} are taken)",
                               span)
        if a > expected:
            raise PatternError(f"heads {expected}..{a - 1} belong to no stage", span,
                               hint=f"the head ranges must tile 0..{max(s.heads[1] for s in stages) - 1}")
        expected = b
    return tuple(st.name for st, _ in ranked)


def schedule(name, stages: dict, outputs, params, by_heads, bindings, spans) -> ProgramIR:
    """Order the stages the outputs need so each follows its sources (depth-first from the outputs); drop the rest."""
    needed: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    for out in outputs:         # iterative depth-first search: a chain of thousands of stages is no recursion
        path: list[str] = []
        todo: list[tuple[str, bool]] = [(out, False)]
        while todo:
            n, leaving = todo.pop()
            if leaving:
                state[n] = 2
                needed.append(n)
                path.pop()
                continue
            if n == INPUT or n in dict(params) or state.get(n) == 2:
                continue
            if n not in stages:
                raise PatternError(f"unknown stage '{n}'", spans.get(path[-1]) if path else None,
                                   hint=did_you_mean(n, list(stages) + [INPUT]))
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise PatternError(f"stages form a cycle: {' -> '.join(cycle)}", spans[n])
            state[n] = 1
            path.append(n)
            todo.append((n, True))
            todo.extend((src, False) for src in reversed(stages[n].sources))
    return ProgramIR(name, tuple(stages[n] for n in needed), tuple(outputs), params, by_heads, bindings)
