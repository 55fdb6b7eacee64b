"""Score terms in the language: syntax, type checks and positioned errors, the printer round trip, the IR,
T5's buckets against transformers and ALiBi's slopes against transformers."""
import math

import pytest
import torch

import patterndsl as pd
from patterndsl.ir import scores as S

P = "pattern p(heads: int = 4, w: int = 8) {{\n param rel[heads, 32]\n {body}\n}}"


def lowered(body: str, **params):
    return pd.parse(P.format(body=body)).lower(**params)


def test_bias_softcap_and_table_lower_to_one_score():
    ir = lowered("attend softmax over sliding(w), bias = -alibi_slope(h, heads) * abs(i - j) + t5_bias(rel), "
                 "softcap = 50")
    st = ir.stages[0]
    assert st.score.softcap == 50.0
    assert st.score.bias.source() == "-alibi_slope(h, 4) * abs(i - j) + t5_bias(rel, 32, 128, true)"
    assert st.score.tables() == ("rel",) and ir.tables == (("rel", 4, 32),)
    assert "softcap = 50.0" in ir.to_text()


def test_a_table_no_stage_reads_is_not_an_input():
    ir = lowered("attend softmax, bias = 1.5")
    assert ir.tables == () and ir.stages[0].score.bias == S.Const(1.5)


def test_equal_terms_give_equal_programs_and_different_terms_do_not():
    a = lowered("attend softmax, bias = 0.5 * (i - j)")
    assert a == lowered("attend softmax, bias = 0.5 * (i - j)")
    assert a != lowered("attend softmax, bias = 0.25 * (i - j)")
    assert a != lowered("attend softmax")


@pytest.mark.parametrize("body", [
    "attend softmax over causal, bias = -alibi_slope(h, heads) * abs(i - j)",
    "attend softmax, bias = t5_bias(rel, 32, 64, false) + 0.5 * min(i, j) / max(h, 1), softcap = 30.5",
    "attend softmax over sliding(w), far = favor(16, seed = 3)",
    "attend softmax over sliding(w), causal = true, far = favor(8)",
    "attend softmax, bias = -(i - j) - -h",
])
def test_round_trip(body):
    prog = pd.parse(P.format(body=body))
    text = prog.to_source()
    again = pd.parse(text)
    assert again.pattern == prog.pattern and again.to_source() == text
    assert again.lower() == prog.lower()


def test_ir_source_of_a_bias_parses_back_to_the_same_term():
    ir = lowered("attend softmax, bias = -(i - j) * 2 - (h - 1) / (j + 1)")
    text = ir.stages[0].score.bias.source()
    assert lowered(f"attend softmax, bias = {text}").stages[0].score == ir.stages[0].score


@pytest.mark.parametrize("text,message,at", [
    ("attend softmax, bias = i > j", "`>` cannot be used in a bias", "i > j"),
    ("attend softmax, bias = i + true", "a bias is a number per pair, got a condition", "true"),
    ("attend softmax, bias = full", "a bias is a number per pair, got Full", "full"),
    ("attend softmax, bias = not i", "`not` does not apply to a bias", "not i"),
    ("attend softmax, bias = i // 2", "`//` cannot be used in a bias", "i // 2"),
    ("attend softmax, bias = i + 1e31", "1e+31 is too large for a bias", "1e31"),
    ("attend softmax, bias = where(i > j)", "where(...) cannot be nested inside a bias", "where"),
    ("attend softmax over where(h > 1)", "`h` (the head) only means something inside a bias", "h >"),
    ("attend softmax over sliding(i)", "`i` only means something inside where(...) or a bias", "i)"),
    ("attend softmax over sliding(alibi_slope(0, 4))", "alibi_slope(...) is a score term", "alibi_slope"),
    ("attend softmax, bias = alibi_slope(i, 4)", "alibi_slope's first argument is the head `h`", "i, 4"),
    ("attend softmax, bias = alibi_slope(h, 0)", "the head count of alibi_slope must be in 1 .. 65536", "0)"),
    ("attend softmax, bias = alibi_slope(h, 2.5)", "the head count of alibi_slope must be an int", "2.5"),
    ("attend softmax, bias = t5_bias(w)", "t5_bias(...) reads a bias table `param NAME[heads, buckets]`, got w",
     "w)"),
    ("attend softmax, bias = t5_bias(rel, 16)", "t5_bias reads 16 buckets but table 'rel' has 32 columns",
     "t5_bias"),
    ("attend softmax, bias = t5_bias(rel, 32, 8)", "max_distance must exceed the 8 exact buckets, got 8", "8)"),
    ("attend softmax, bias = t5_bias(rel, 2)", "t5_bias needs at least 4 buckets, got 2", "t5_bias"),
    ("attend softmax, bias = t5_bias(rel, bidirectional = 1)", "bidirectional must be a bool, got int", "1)"),
    ("attend softmax query rel", "'rel' is a bias table, not a source of queries or keys", "rel"),
    ("attend nested(rel), causal = true", "'rel' is a bias table, nested(...) needs packed queries", "rel)"),
    ("attend linear(elu1), bias = 1.0", "bias = ... applies to softmax attention only", "bias"),
    ("attend softmax, softcap = 0", "softcap must be a finite number > 0, got 0.0", "0"),
    ("attend softmax, softcap = full", "the option softcap must be a float, got mask", "full"),
    ("attend softmax over sliding(2), far = elu1", "far = ... takes favor(...) features, got Elu1", "elu1"),
    ("attend softmax over sliding(2), far = favor(4), bias = 1.0",
     "bias = ... cannot be combined with far = ...", "bias"),
    ("attend softmax, far = favor(4)", "far = ... estimates the keys outside the mask, and this mask leaves none",
     "far"),
    ("attend softmax, bias = 1, bias = 2", "option 'bias' is given twice", "bias = 2"),
])
def test_score_errors_are_positioned(text, message, at):
    src = P.format(body=text)
    with pytest.raises(pd.PatternError) as info:
        pd.parse(src).lower()
    e = info.value
    assert message in e.message, str(e)
    body_line = src.splitlines()[2]
    assert (e.line, e.column) == (3, body_line.rindex(at) + 1 if at == "0" else body_line.index(at) + 1), str(e)
    assert "^" in str(e)


@pytest.mark.parametrize("decl,message,at", [
    ("param t[0, 4]", "bias table 't' must have at least 1 of its heads, got 0", "0"),
    ("param t[2, 0]", "bias table 't' must have at least 1 of its columns, got 0", "0]"),
    ("param t[70000, 1]", "bias table 't' [70000, 1] is too large", "t["),
])
def test_table_declaration_errors(decl, message, at):
    src = f"pattern p() {{\n {decl}\n attend softmax, bias = t5_bias(t, 4)\n}}"
    with pytest.raises(pd.PatternError) as info:
        pd.parse(src).lower()
    assert message in info.value.message
    assert (info.value.line, info.value.column) == (2, decl.index(at) + 2)


# -------------------------------------------------------------------------------------------- T5, ALiBi
@pytest.mark.parametrize("buckets,max_distance,bidirectional", [
    (32, 128, True), (32, 128, False), (8, 20, True), (64, 1000, False), (6, 7, True), (2, 3, False)])
def test_t5_buckets_equal_transformers(buckets, max_distance, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention
    r = torch.arange(-3 * max_distance - 5, 3 * max_distance + 5)
    want = T5Attention._relative_position_bucket(r, bidirectional=bidirectional, num_buckets=buckets,
                                                 max_distance=max_distance)
    term = S.T5Bias("rel", buckets, max_distance, bidirectional)
    from patterndsl.ir.scores.ops import TorchScoreOps
    i = torch.zeros(1, dtype=torch.long)[:, None] + 3 * max_distance + 5
    j = (r + 3 * max_distance + 5)[None, :]
    got = term.bucket(TorchScoreOps(i, j, torch.zeros(1, 1, 1, dtype=torch.long)))
    assert torch.equal(got[0], want)


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 8, 12, 16, 24])
def test_alibi_slopes_equal_transformers(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    alibi = build_alibi_tensor(torch.ones(1, 2), heads, torch.float64)   # slope * position, positions 0, 1
    want = alibi[:, 0, 1].tolist()                                      # [B * heads, 1, N]
    assert S.slopes(heads) == pytest.approx(want, rel=1e-6)   # transformers computes the extra slopes in float32


def test_a_table_is_declared_before_its_use():
    src = "pattern p() {\n attend softmax, bias = t5_bias(t, 4)\n param t[2, 4]\n}"
    with pytest.raises(pd.PatternError) as info:
        pd.parse(src).lower()
    assert "bias table 't' is used before its declaration" in info.value.message
    assert (info.value.line, info.value.column) == (2, 33)


def test_alibi_slope_of_a_fixed_head_is_a_number():
    ir = lowered("attend softmax, bias = alibi_slope(1, 4)")
    assert ir.stages[0].score.bias == S.Const(S.slopes(4)[1]) and math.isclose(S.slopes(4)[1], 2 ** -4)
