"""Lowering to the IR: values, masks, stages, head ranges, and every value/parameter error with its position."""
import pytest
import torch

import patterndsl as pd
from patterndsl.ir import mask as M
from patterndsl.ir.program import Favor, Linear, Nested, ReluFeatures, Softmax


def lower(text, **params):
    return pd.parse(text).lower(**params)


def error(text, **params) -> pd.PatternError:
    with pytest.raises(pd.PatternError) as info:
        lower(text, **params)
    return info.value


def test_longformer_lowers_to_band_and_globals():
    ir = pd.builtin("longformer").lower(window=8, globals={0, 5})
    (st,) = ir.stages
    assert isinstance(st.normaliser, Softmax)
    assert st.mask == M.sliding(4) | M.global_({0, 5})
    assert ir.outputs == (st.name,)


def test_causal_option_folds_into_the_mask():
    ir = lower("pattern p(w: int = 3) { attend softmax over sliding(w), causal = true }")
    assert ir.stages[0].mask == M.Band(0, 3, 1)


def test_equal_patterns_written_differently_are_equal():
    a = lower("pattern a() { attend softmax over sliding(2) | causal }")
    b = lower("pattern b() { attend softmax over causal | window(2, 2) }")
    assert a == b and hash(a) == hash(b)


def test_parameter_change_changes_the_ir():
    prog = pd.builtin("longformer")
    assert prog.lower(window=8) != prog.lower(window=16)


def test_where_builds_a_predicate_with_parameters_folded():
    ir = lower("pattern p(k: int = 3) { attend softmax over where(j % k == k - 1 and i >= j) }")
    m = ir.stages[0].mask
    assert isinstance(m, M.Where)
    assert str(m.pred) == "j % 3 == 2 and i >= j"


def test_constant_where_folds():
    assert lower("pattern p() { attend softmax over where(1 < 2) }").stages[0].mask == M.FULL


def test_luna_is_a_two_stage_graph():
    ir = pd.builtin("luna").lower(length=4)
    assert ir.params == (("p", 4),)
    assert [s.name for s in ir.stages] == ["packed", "out"]
    assert ir.stage("packed").query == "p" and ir.stage("out").keys == "packed"
    assert ir.outputs == ("out", "packed")
    g = ir.graph()
    assert g.has_edge("p", "packed") and g.has_edge("packed", "out") and g.has_edge("input", "packed")


def test_performer_kernel_choice():
    ir = pd.builtin("performer").lower(features=16, causal=True)
    st = ir.stages[0]
    assert isinstance(st.normaliser, Linear) and isinstance(st.normaliser.feature_map, Favor)
    assert st.causal and st.normaliser.feature_map.features == 16


@pytest.mark.parametrize("program,params,message,hint", [
    ("performer", dict(kernel="rel"), 'parameter \'kernel\' must be one of "favor", "relu", got "rel"',
     "did you mean 'relu'?"),
    ("sparse_transformer", dict(variant="fxed"), 'parameter \'variant\' must be one of "strided", "fixed", got "fxed"',
     "did you mean 'fixed'?"),
    ("performer", dict(scaling=2), "parameter 'scaling' must be one of 0, 1, got 2", None),
    ("pattern p(n: int in {1, 2} = 3) { attend softmax over sliding(n) }", {},
     "parameter 'n' must be one of 1, 2, got 3", None),
    ("pattern p(s: str in {\"a\", 1} = \"a\") { attend softmax }", {},
     "a choice of parameter 's' must be a str, got int", None),
])
def test_parameter_choices(program, params, message, hint):
    """A misspelt option is an error naming the parameter, never a silent fall into the else branch."""
    with pytest.raises(pd.PatternError) as info:
        pd.compile(program, **params)
    assert message in info.value.message
    assert info.value.hint == hint and info.value.line is not None


def test_parameter_choices_accept_each_choice():
    assert isinstance(pd.compile("performer", kernel="relu").ir.stages[0].normaliser.feature_map, ReluFeatures)
    fixed = pd.compile("sparse_transformer", variant="fixed", stride=4, summary=1)
    assert fixed.ir.stages[0].mask != pd.compile("sparse_transformer", stride=4).ir.stages[0].mask


def test_nested_stage():
    st = pd.builtin("luna_causal").lower(length=8).stages[0]
    assert st.normaliser == Nested("p") and st.causal


def test_per_head_hybrid_tiles_the_heads():
    ir = pd.builtin("longformer_performer").lower(num_heads=6, local_heads=2)
    assert ir.by_heads and ir.num_heads == 6
    assert [ir.stage(o).heads for o in ir.outputs] == [(0, 2), (2, 6)]


def test_dead_stages_are_dropped():
    ir = lower("pattern p() { unused = attend softmax over causal\n out = attend softmax\n return out }")
    assert [s.name for s in ir.stages] == ["out"]


# ------------------------------------------------------------------------------------------ value errors
@pytest.mark.parametrize("text,message,col", [
    ("pattern p() { attend softmax over sliding(-1) }", "window width must be >= 0, got -1", 43),
    ("pattern p() { attend softmax over sliding(2, 0) }", "dilation must be >= 1, got 0", 46),
    ("pattern p() { attend softmax over blocks(0) }", "block size must be >= 1, got 0", 42),
    ("pattern p() { attend softmax over strided(0) }", "stride must be >= 1, got 0", 43),
    ("pattern p() { attend softmax over global({0, -2}) }", "token index -2 is negative", 46),
    ("pattern p() { attend linear(favor(0)) }", "features must be >= 1, got 0", 35),
    ("pattern p() { attend linear(favor(8, scaling = 2)) }", "scaling must be 0 (chi norms) or 1", 48),
    ("pattern p() { attend softmax over sliding(4 // 0) }", "division by zero", 48),
    ("pattern p() { attend softmax over global(range(5, 2)) }", "range stop 2 is below its start 5", 51),
    ("pattern p() { attend softmax, scale = 0 }", "scale must be > 0, got 0", 39),
    ("pattern p() { attend linear(elu1), scale = 0.5 }", "scale applies to softmax attention only", 36),
])
def test_value_errors_point_at_the_argument(text, message, col):
    err = error(text)
    assert message in err.message
    assert (err.line, err.column) == (1, col)
    assert "^" in str(err) and "<string>:1:" in str(err)


def test_linear_over_a_sparse_mask_is_rejected_with_a_hint():
    err = error("pattern p() { attend linear(elu1) over sliding(4) }")
    assert "linear attention runs over `full` or `causal` only" in err.message
    assert "heads[a:b]" in err.hint and err.column == 40


def test_nested_must_be_causal():
    err = error("pattern p() { param q[4]\n attend nested(q) }")
    assert "nested(...) is causal Luna" in err.message and "luna" in err.hint


@pytest.mark.parametrize("heads,message", [
    ("heads[0:4] attend softmax\n heads[3:8] attend elu1_", "overlaps"),
    ("heads[0:2] attend softmax\n heads[3:8] attend elu1_", "heads 2..2 belong to no stage"),
    ("heads[2:2] attend softmax\n heads[2:8] attend elu1_", "head range heads[2:2] is empty"),
    ("heads[1:2] attend softmax\n heads[2:8] attend elu1_", "heads 0..0 belong to no stage"),
])
def test_head_ranges_must_tile(heads, message):
    body = heads.replace("elu1_", "linear(elu1)")
    err = error("pattern p() {\n " + body + "\n}")
    assert message in err.message and err.line in (2, 3)


# ------------------------------------------------------------------------------- compile-time parameters
def test_unknown_parameter_has_did_you_mean():
    with pytest.raises(pd.PatternError) as info:
        pd.compile("longformer", windw=8)
    assert "unknown parameter 'windw' for pattern longformer" in info.value.message
    assert info.value.hint == "did you mean 'window'?"
    assert "builtin:longformer.attn" in str(info.value)


@pytest.mark.parametrize("params,message", [
    (dict(window="big"), "parameter 'window' expects int, got str 'big'"),
    (dict(window=True), "parameter 'window' expects int, got bool True"),
    (dict(window=2.5), "parameter 'window' expects int, got float 2.5"),
    (dict(globals=[0, -1]), "parameter 'globals' holds token indices (ints >= 0), got -1"),
    (dict(globals="0"), "parameter 'globals' expects set, got str '0'"),
    (dict(causal=1), "parameter 'causal' expects bool, got int 1"),
])
def test_compile_time_parameters_are_type_checked(params, message):
    with pytest.raises(pd.PatternError) as info:
        pd.compile("longformer", **params)
    assert message in info.value.message
    assert info.value.line is not None  # points at the parameter's declaration


def test_compile_time_value_errors_point_into_the_source():
    with pytest.raises(pd.PatternError) as info:
        pd.compile("longformer", dilation=0)
    assert "dilation must be >= 1, got 0" in info.value.message
    assert "sliding(window // 2, dilation)" in str(info.value)
    assert info.value.hint == "with the parameters given at compile time: dilation=0"
    with pytest.raises(pd.PatternError, match=r"parameter 'globals' holds token indices \(ints >= 0\), got -1"):
        pd.compile("longformer", globals={3, -1})


def test_missing_required_parameter():
    with pytest.raises(pd.PatternError) as info:
        pd.compile("pattern p(w: int) { attend softmax over sliding(w) }")
    err = info.value
    assert "parameter 'w' of pattern p has no default and was not given" in err.message
    assert lower("pattern p(w: int) { attend softmax over sliding(w) }", w=2).stages[0].mask == M.sliding(2)


def test_set_parameters_accept_any_int_collection():
    ir = pd.builtin("longformer").lower(globals=range(3))
    assert ir.stages[0].mask == M.sliding(256) | M.global_({0, 1, 2})
    ir = pd.builtin("longformer").lower(globals=torch.tensor([1, 2]).tolist())
    assert M.Rows(frozenset({1, 2})) in ir.stages[0].mask.parts


def test_defaults_may_use_earlier_parameters():
    ir = lower("pattern p(w: int = 4, half: int = w // 2) { attend softmax over sliding(half) }", w=10)
    assert ir.stages[0].mask == M.sliding(5)


def test_long_stage_chains_lower_without_recursion():
    body = "\n".join(f"    s{k} = attend softmax query s{k - 1}" for k in range(1, 3000))
    ir = pd.parse(f"pattern p() {{\n    s0 = attend softmax\n{body}\n    return s2999\n}}").lower()
    assert [s.name for s in ir.stages] == [f"s{k}" for k in range(3000)]
