"""Lowering the score options of an attend (`, bias = ...`, `, softcap = ...`, `, far = ...`) and bias tables
(`param t[heads, width]`) to the score IR, with positioned errors."""
from __future__ import annotations

from ...errors import PatternError
from .build import MAX_HEADS, as_term
from .far import Far
from .score import Score
from .softcap import check_cap

MAX_TABLE = 1 << 24   # most entries a bias table may hold


def bias_table(st, env) -> tuple[int, int]:
    """(heads, width) of `param t[heads, width]`."""
    from ..values import evaluate, expect
    heads = expect(evaluate(st.length, env), "int", st.length.span, f"the head count of table '{st.name}'")
    width = expect(evaluate(st.width, env), "int", st.width.span, f"the width of table '{st.name}'")
    for v, span, what in ((heads, st.length.span, "heads"), (width, st.width.span, "columns")):
        if v < 1:
            raise PatternError(f"bias table '{st.name}' must have at least 1 of its {what}, got {v}", span)
    if heads > MAX_HEADS or heads * width > MAX_TABLE:
        raise PatternError(f"bias table '{st.name}' [{heads}, {width}] is too large (at most {MAX_HEADS} heads, "
                           f"{MAX_TABLE} entries)", st.span)
    return heads, width


def score_option(opt, env, evaluate):
    """The value of one score option."""
    from ..program import Favor
    from ..values import Env, expect
    if opt.name == "bias":
        inner = Env(env.values, env.tensors, in_score=True, tables=env.tables)
        return as_term(evaluate(opt.value, inner), opt.value.span)
    v = evaluate(opt.value, env)
    if opt.name == "softcap":
        cap = expect(v, "float", opt.value.span, "the option softcap")
        problem = check_cap(cap)
        if problem:
            raise PatternError(problem, opt.value.span, hint="Gemma 2 caps attention logits at 50.0")
        return cap
    fm = expect(v, "featuremap", opt.value.span, "the option far")
    if not isinstance(fm, Favor):
        raise PatternError(f"far = ... takes favor(...) features, got {type(fm).__name__}", opt.value.span,
                           hint="e.g. far = favor(64)")
    return fm


def stage_score(terms: dict, att, norm, mask, causal: bool) -> Score:
    """The stage's `Score`; score terms need softmax, and the far field excludes the pointwise terms."""
    from .. import mask as M
    from ..program import Softmax
    first = next(o for o in att.options if o.name in terms)
    if not isinstance(norm, Softmax):
        raise PatternError(f"{first.name} = ... applies to softmax attention only", first.span,
                           hint="score terms change exp(s) of exact softmax; linear and nested stages have none")
    far = None
    if "far" in terms:
        pointwise = [o for o in att.options if o.name in ("bias", "softcap")]
        if pointwise:
            raise PatternError(f"{pointwise[0].name} = ... cannot be combined with far = ...", pointwise[0].span,
                               hint="the far field estimates exp(q.k) itself; a bias or a cap has no estimate")
        if mask in (M.FULL, M.CAUSAL):
            raise PatternError("far = ... estimates the keys outside the mask, and this mask leaves none", first.span,
                               hint="give the near field as the mask: over sliding(64), far = favor(64)")
        far = Far(terms["far"], causal)
    return Score(terms.get("bias"), terms.get("softcap"), far)
