"""The language's limits (docs/language.md §7): numbers, `where` ranges and types, nesting, large literals.

Every refusal is a PatternError with its message, line and column checked; values just inside a limit work.
"""
import pytest
import torch

import patterndsl as pd
from patterndsl.grammar import limits
from patterndsl.grammar.limits import INT_LIMIT, MAX_DEPTH
from patterndsl.ir import mask as M

HEAD = "pattern p() { attend softmax over "   # masks below start at column 35


def refused(text, **params) -> pd.PatternError:
    with pytest.raises(pd.PatternError) as info:
        pd.compile(text, backend="reference", **params)
    assert "^" in str(info.value) or info.value.line is None
    return info.value


def where(mask: str):
    return pd.parse(HEAD + mask + " }").lower().stages[0].mask


# ----------------------------------------------------------------------------------------------- literals
@pytest.mark.parametrize("text,message,col", [
    (HEAD + "sliding(1099511627776) }", "integer 1099511627776 is too large: integers stay below 2^40", 43),
    (HEAD + "where(i < 99999999999999999999999) }", "integer 99999999999999999999999 is too large", 45),
    (HEAD + "sliding(" + "9" * 5000 + ") }", "integer of 5000 digits is too large", 43),
    (HEAD + "global({0, 5, 1099511627776}) }", "integer 1099511627776 is too large", 49),
    ("pattern p() { attend softmax, scale = 1e999 }", "number 1e999 is too large for a 64-bit float", 39),
    ("pattern p() { attend softmax, scale = 1e-999 }", "number 1e-999 is too small for a 64-bit float", 39),
    ("pattern p(t: float = 1" + "0" * 400 + ".0) { attend softmax }", "is too large for a 64-bit float", 22),
    ("pattern p() { attend linear(favor(4, eps = 1e999)) }", "number 1e999 is too large", 44),
], ids=["int-2^40", "int-in-where", "int-5000-digits", "int-in-set", "float-inf", "float-underflow",
        "float-400-digits", "eps-inf"])
def test_literals_out_of_range(text, message, col):
    e = refused(text)
    assert message in e.message
    assert (e.line, e.column) == (1, col)
    assert "Limits" in e.hint or "0" in e.hint


def test_literals_at_the_limit_and_zero():
    assert where(f"sliding({INT_LIMIT - 1})") == M.sliding(INT_LIMIT - 1)
    assert where("global({000012})") == M.global_({12})
    prog = pd.parse("pattern p(t: float = 0.0e-999) { attend softmax, scale = 1e308 }")
    assert prog.lower().stages[0].normaliser.scale == 1e308


# ------------------------------------------------------------------------------------- compile-time values
@pytest.mark.parametrize("params,message", [
    (dict(w=INT_LIMIT), "parameter 'w' is 1099511627776, too large"),
    (dict(w=-10 ** 30), "parameter 'w' is -1000000000000000000000000000000, too large"),
    (dict(s=float("inf")), "parameter 's' must be a finite number, got inf"),
    (dict(s=float("nan")), "parameter 's' must be a finite number, got nan"),
    (dict(g={0, 1 << 50}), "parameter 'g' holds 1125899906842624, too large"),
])
def test_compile_time_values_out_of_range(params, message):
    text = "pattern p(w: int = 1, s: float = 1.0, g: set = {0}) {\n  attend softmax over where(i < w), scale = s\n}"
    e = refused(text, **params)
    assert message in e.message
    assert (e.line, e.column) == (1, {"w": 11, "s": 23, "g": 39}[next(iter(params))])


def test_compile_time_values_name_the_parameters_once():
    e = refused("pattern p(w: int = 1) { attend softmax over where(i * w * w * w < j) }", w=1 << 39)
    assert "beyond the 64-bit integers" in e.message
    assert e.hint.count("with the parameters given at compile time: w=549755813888") == 1


# ------------------------------------------------------------------------------------------- bands, eps
@pytest.mark.parametrize("mask,col", [("sliding(1000000000000, 1000000000)", 35),
                                      ("causal | window(1, 1000000000000, dilation = 1000000)", 44)])
def test_band_reach_is_bounded(mask, col):
    e = refused(HEAD + mask + " }")
    assert "positions (its size times its dilation), too far: positions stay below 2^40" in e.message
    assert (e.line, e.column) == (1, col)


def test_band_reach_just_inside_the_limit_runs():
    op = pd.compile(HEAD + "sliding(1048575, 1048576) }", backend="reference")   # (2^20 - 1) * 2^20 < 2^40
    q = torch.randn(1, 1, 5, 2)
    assert torch.isfinite(op(q, q, q)).all()


@pytest.mark.parametrize("text,col", [("pattern p() { attend linear(favor(4, eps = 2)) }", 44),
                                      ("pattern p() { attend linear(favor(4, true, 0, 1e30)) }", 47)])
def test_eps_above_one_is_refused(text, col):
    e = refused(text)
    assert e.message.startswith("eps must be at most 1, got") and (e.line, e.column) == (1, col)


# ---------------------------------------------------------------------------------------------- where
@pytest.mark.parametrize("mask,message,col", [
    ("where(i + true > 1)", "`+` takes integers inside where(...), got a bool", 45),
    ("where(min(i, false) < j)", "`min` takes integers inside where(...), got a bool", 48),
    ("where(-true < j)", "cannot negate bool", 42),
    ("where((i < j) + 1 > 0)", "`+` takes integers inside where(...), got a condition", 42),
    ("where(i < j == j < i)", "unexpected", 47),
    ("where((i < j) == i)", "`==` takes integers inside where(...), got a condition", 42),
    ("where(i < j and 3)", "`and` takes conditions inside where(...), got an integer", 51),
    ("where(not i)", "`not` takes conditions inside where(...), got an integer", 45),
    ("where(i * 4611686018427387904 < j)", "integer 4611686018427387904 is too large", 45),
    ("where(i * 1099511627775 < j)", "this value can reach 2^71.0 for positions below 2^31", 41),
    ("where(abs(i - j) * i * i * 4 < j)", "this value can reach 2^93.0", 41),
    ("where(i < j and i * j * 3 > 0)", "this value can reach 2^63.6", 51),
])
def test_where_types_and_ranges(mask, message, col):
    e = refused(HEAD + mask + " }")
    assert message in e.message, str(e)
    assert (e.line, e.column) == (1, col), str(e)


def test_where_bools_from_parameters_are_not_integers():
    e = refused("pattern p(b: bool = true) { attend softmax over where(i + b > j) }")
    assert e.message == "`+` takes integers inside where(...), got a bool" and (e.line, e.column) == (1, 59)


def test_where_inside_the_limits_matches_python():
    """Largest products of positions and constants still allowed, and conditions compared with ==."""
    allowed = ["where(i * j < 10)", "where(i * 1073741824 + j >= j * 1073741824)", "where((i < j) == (j < 3))",
               "where(i % 1099511627775 + j // 1099511627775 < 5)", "where(i < (if 1 < 2 then 3 else 4))",
               "where(-i < -3 or max(i, j) % 3 == abs(i - j) // 2)"]
    for mask in allowed:
        op = pd.compile(HEAD + mask + " }", backend="reference")
        got = op.mask(9)
        pred = where(mask).pred
        from patterndsl.ir.predicate import PYTHON_OPS, evaluate
        want = torch.tensor([[bool(evaluate(pred, a, b, PYTHON_OPS)) for b in range(9)] for a in range(9)])
        assert torch.equal(got, want), mask


def test_range_bounds_are_sound():
    """The interval of every integer expression holds every value it takes (checked on a grid)."""
    from patterndsl.grammar import ast
    from patterndsl.ir.predicate import range_bin as _divide
    for op in ("//", "%"):
        for a in [(-7, 5), (0, 9), (3, 3)]:
            for b in [(-3, 4), (2, 2), (-4, -4), (0, 0), (1, 6)]:
                lo, hi = _divide(op, a, b)
                for x in range(a[0], a[1] + 1):
                    for y in range(b[0], b[1] + 1):
                        r = 0 if y == 0 else (x // y if op == "//" else x % y)
                        assert lo <= r <= hi, (op, a, b, x, y)
    assert ast  # the module under test builds on the AST


# -------------------------------------------------------------------------------------------- nesting
def _nest(kind: str, n: int) -> str:
    """A mask `n` levels deep (both rules, docs/language.md §7), built from one construct."""
    return {
        "parens": "(" * n + "full" + ")" * n,                                       # n open, 0 deep
        "complement": "~" * n + "full",                                             # n open, n deep
        "negation": "sliding(" + "-" * (n - 1) + "0)",
        "not": "if " + "not " * (n - 1) + "true then full else causal",
        "if": "if true then " * n + "full" + " else causal" * n,
        "calls": "sliding(" + "min(1, " * (n - 1) + "1" + ")" * (n - 1) + ")",
        "right-sub": "sliding(" + "1 - (" * (n - 1) + "1" + ")" * (n - 1) + ")",
    }[kind]


# what each construct nested MAX_DEPTH (200) levels means: ~^200 full, -^199 0, not^199 true, 1 - (1 - ...)
NESTED_MEANS = {"parens": "full", "complement": "full", "negation": "sliding(0)", "not": "causal", "if": "full",
                "calls": "sliding(1)", "right-sub": "sliding(0)"}


@pytest.mark.parametrize("kind,col", [("parens", 235), ("complement", 235), ("negation", 242), ("not", 834),
                                      ("if", 2635), ("calls", 1439), ("right-sub", 1042)])
def test_nesting_limit_holds_for_every_construct(kind, col):
    """MAX_DEPTH levels work; one more is refused at the bracket, operator or `if` that opens it."""
    got = pd.compile(HEAD + _nest(kind, MAX_DEPTH) + " }", backend="reference").mask(9, 9)
    assert torch.equal(got, pd.compile(HEAD + NESTED_MEANS[kind] + " }", backend="reference").mask(9, 9)), kind
    e = refused(HEAD + _nest(kind, MAX_DEPTH + 1) + " }")
    assert e.message == "expression nested too deeply: more than 200 brackets, unary operators and ifs open here"
    assert (e.line, e.column) == (1, col), str(e)
    assert e.hint == "split it into named values: NAME = ..."


def test_a_long_chain_of_one_operator_is_deep():
    """`1 + 1 + ...` nests one level per `+`: 200 work, the operand that makes 201 is the caret."""
    def text(n):
        return "pattern p(w: int = " + " + ".join(["1"] * (n + 1)) + ") { attend softmax over sliding(w) }"
    assert pd.compile(text(MAX_DEPTH), backend="reference").ir.stages[0].mask == M.sliding(MAX_DEPTH + 1)
    e = refused(text(MAX_DEPTH + 1))
    assert e.message == "expression nested too deeply: more than 200 levels deep"
    assert (e.line, e.column) == (1, 20 + 4 * (MAX_DEPTH + 1))
    e = refused("pattern p() { attend softmax over sliding(" + " + ".join(["1"] * (MAX_DEPTH + 1)) + ") }")
    assert (e.line, e.column) == (1, 43)   # the call is level 201: the caret is at its too-deep argument


def test_nesting_limit_holds_inside_parameters_sets_and_heads():
    deep = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)
    for text, col in [(f"pattern p(w: int = {deep}) {{ attend softmax }}", 220),
                      (f"pattern p(w: set in {{{{1}}, {{{deep}}}}} = {{1}}) {{ attend softmax }}", 227),
                      (f"pattern p() {{ heads[0:{deep}] attend softmax }}", 223)]:
        e = refused(text)
        assert "nested too deeply" in e.message and (e.line, e.column) == (1, col), (text[:40], str(e))


def test_the_balanced_tree_is_measured_exactly():
    """Balancing a chain puts its operands under log2(n) levels: 199 complements under a 4-term union are
    201 deep, which only the exact top-down measure after balancing sees (at the 199th `~`)."""
    e = refused(HEAD + "full | full | full | " + "~" * 199 + "full }")
    assert e.message == "expression nested too deeply: more than 200 levels deep"
    assert (e.line, e.column) == (1, 56 + 198)
    ok = pd.compile(HEAD + "full | full | " + "~" * 199 + "full }", backend="reference")   # 1 + 199 levels
    assert bool(ok.mask(5, 5).all())                                   # full | full | (~^199 full = empty)


def test_chains_of_associative_operators_are_balanced():
    chain = " | ".join(f"cols({{{k}}})" for k in range(3000))
    assert where(chain) == M.cols(set(range(3000)))
    assert where("(((cols({1}) | cols({2})) | cols({3})) | cols({4}))") == M.cols({1, 2, 3, 4})


# --------------------------------------------------------------------------------------------- big sets
def test_integer_sets_are_one_token_with_spans_per_element():
    text = "pattern p() { attend softmax over global({1,\n  22,   333, # c\n 4}) | cols({5,\n  6,\n})\n}"
    mask = pd.parse(text).pattern.body[0].mask
    first = mask.left.args[0]   # a comment inside: the general path
    second = mask.right.args[0]
    assert [(n.value, n.span.line, n.span.column) for n in first.items] == [(1, 1, 43), (22, 2, 3), (333, 2, 9),
                                                                           (4, 3, 2)]
    assert [(n.value, n.span.line, n.span.column) for n in second.items] == [(5, 3, 14), (6, 4, 3)]
    e = refused("pattern p() { attend softmax over global({1,\n 2, 1099511627776}) }")
    assert (e.line, e.column) == (2, 5) and "too large" in e.message


def test_a_large_integer_set_means_its_elements():
    n = 100_000
    text = HEAD + "global({" + ", ".join(map(str, range(0, 2 * n, 2))) + "}) }"
    assert pd.parse(text).lower().stages[0].mask == M.global_(set(range(0, 2 * n, 2)))


def test_empty_and_mixed_sets_take_the_general_path():
    assert where("cols({})") == M.EMPTY or where("cols({})") == M.cols(set())
    assert where("cols({1 + 1, 3})") == M.cols({2, 3})
    e = refused(HEAD + "cols({1, -2}) }")
    assert "negative" in e.message and (e.line, e.column) == (1, 44)


def test_limits_module_constants_agree_with_the_docs():
    from pathlib import Path
    doc = (Path(__file__).parents[1] / "docs" / "language.md").read_text()
    assert limits.INT_LIMIT == 2 ** 40 and "2^40" in doc
    assert limits.POSITION_LIMIT == 2 ** 31 and "2^31" in doc
    assert limits.WHERE_LIMIT == 2 ** 63 and "2^63" in doc
    assert f"{MAX_DEPTH}" in doc


@pytest.mark.parametrize("form", ["over if true then {e} else causal", "over if true then causal else {e}"])
def test_printing_a_program_at_the_nesting_limit_keeps_it_parseable(form):
    from patterndsl.grammar.parser import parse_module
    from patterndsl.grammar.printer import print_module
    e = "sliding(1)"
    for _ in range(MAX_DEPTH - 1):   # the deepest chain of `if`s the parser accepts
        e = form.removeprefix("over ").format(e=e)
    text = print_module(parse_module(f"pattern p() {{ attend softmax over {e} }}", "deep.attn"))
    assert print_module(parse_module(text, "printed.attn")) == text
