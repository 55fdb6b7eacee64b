"""The front end: syntax and check errors (message, line, column, caret), the printer round trip, fuzzing."""
import dataclasses
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.ir import mask as M
from patterndsl.grammar import ast, parse_module, print_module


def err(text) -> pd.PatternError:
    with pytest.raises(pd.PatternError) as info:
        pd.parse(text)
    return info.value


# --------------------------------------------------------------------------------------------- syntax
@pytest.mark.parametrize("text,message,line,col,hint", [
    ("pattern p() { attend softmax over sliding(2 }", "unexpected '}'", 1, 45, "')'"),
    ("pattern p() {\n  attend softmax over $ }", "unexpected character '$'", 2, 23, None),
    ("pattern p() { attend softmax", "unexpected end of file", 1, 29, "expected"),
    ("pattern p(w: integer) { attend softmax }", "unknown type 'integer' for parameter 'w'", 1, 14, None),
    ("pattern p() { attend softmax over full over causal }", "`over` is given twice in one attend", 1, 40, None),
    ("pattern p() { attend softmax over sliding(w = 2, 1) }", "positional argument follows a keyword", 1, 50, None),
    ("pattern p() { attend softmax over sliding(2, dilation = 1, dilation = 2) }",
     "keyword argument 'dilation' is given twice", 1, 60, None),
    ("pattern p() { attend softmax over 1 < 2 < 3 }", "unexpected '<'", 1, 41, None),
    ("pattern p() { attend softmax over sliding(\u0663) }", "unexpected character '\u0663'", 1, 43, "ASCII digits"),
    ("pattern p() { attend softmax over sliding(\uff13) }", "unexpected character '\uff13'", 1, 43, "ASCII digits"),
    ("pattern p\u00e9() { attend softmax }", "unexpected character '\u00e9'", 1, 10, "names are ASCII"),
])
def test_syntax_errors(text, message, line, col, hint):
    e = err(text)
    assert message in e.message
    assert (e.line, e.column) == (line, col)
    if hint:
        assert hint in e.hint
    rendered = str(e).splitlines()
    assert rendered[0].startswith(f"<string>:{line}:{col}: error:")
    assert rendered[2].index("^") == col + 1  # two spaces of indent, then the caret under the column


# ---------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("text,message,line,col,hint", [
    ("pattern p() { attend softmax over slidng(2) }", "unknown function 'slidng'", 1, 35, "did you mean 'sliding'?"),
    ("pattern p(window: int = 4) { attend softmax over sliding(windw) }", "unknown name 'windw'", 1, 58,
     "did you mean 'window'?"),
    ("pattern p() { attend softmax over sliding }", "'sliding' needs arguments", 1, 35, "sliding(width: int"),
    ("pattern p() { attend softmax over sliding(1, 2, 3) }", "sliding takes 2 arguments, got 3", 1, 49, None),
    ("pattern p() { attend softmax over sliding(dilation = 2) }", "sliding is missing its argument 'width'", 1, 35,
     None),
    ("pattern p() { attend softmax over sliding(2, dilaton = 2) }", "sliding has no argument 'dilaton'", 1, 46,
     "did you mean 'dilation'?"),
    ("pattern p() { attend softmax over i < j }", "`i` only means something inside where(...)", 1, 35, None),
    ("pattern p(a: int = 1, a: int = 2) { attend softmax }", "parameter 'a' is declared twice", 1, 23, None),
    ("pattern p() { x = attend softmax\n x = attend softmax\n return x }", "'x' is defined twice", 2, 2, None),
    ("pattern p() { attend softmax query pp }", "unknown stage 'pp'", 1, 36, None),
    ("pattern p() { attend softmax, casual = true }", "unknown option 'casual'", 1, 31, "did you mean 'causal'?"),
    ("pattern p() { attend softmax, causal = true, causal = false }", "option 'causal' is given twice", 1, 46, None),
    ("pattern p() { a = attend softmax query b\n b = attend softmax query a\n return a }",
     "stages form a cycle", 1, 19, None),
    ("pattern p() { x = sliding(2) }", "pattern 'p' has no attend stage", 1, 9, None),
    ("pattern p() { attend softmax\n attend softmax }", "several unnamed attend stages", 2, 2, "heads[a:b]"),
    ("pattern p() { heads[0:1] attend softmax\n attend softmax }", "some unnamed stages have heads", 2, 2, None),
    ("pattern p() { out = attend softmax\n return out\n x = attend softmax }", "return must be the last", 2, 2,
     None),
    ("pattern p() { out = attend softmax\n return nope }", "return names 'nope', which is not a named stage", 2, 9,
     None),
    ("pattern p() { attend nested(q), causal = true }", "nested(...) needs a tensor param, 'q' is not one", 1, 29,
     None),
    ("pattern p(s: int = 1) { attend softmax over same(s) }", "same(...) takes the name of a runtime input", 1, 50,
     None),
    ("pattern p() { attend softmax over where(where(i < j)) }", "cannot be nested inside where", 1, 41, None),
    ("pattern p() { attend softmax }\npattern p() { attend softmax }", "pattern 'p' is defined twice", 2, 9,
     None),
    ("", "no pattern in this file", None, None, None),
    ("pattern p() { attend softmax over sliding(\"2\") }", "argument 'width' of sliding must be an int, got str",
     1, 43, None),
    ("pattern p() { attend softmax over 3 }", "`over` must be a mask, got int", 1, 35, None),
    ("pattern p() { attend sliding(2) }", "the normaliser must be a normaliser, got mask", 1, 22, None),
    ("pattern p(c: bool = 1) { attend softmax }", "the default of parameter 'c' must be a bool, got int", 1, 21,
     None),
])
def test_check_errors(text, message, line, col, hint):
    e = err(text)
    assert message in e.message, str(e)
    assert (e.line, e.column) == (line, col), str(e)
    if hint:
        assert hint in (e.hint or "")


@pytest.mark.parametrize("text,message,line,col", [
    ("pattern p() { input = attend softmax\n return input }", "'input' is the op's input and cannot be redefined",
     1, 15),
    ("pattern p() { a = attend softmax\n x = a | causal\n return a }", "'a' is a tensor source, not a value", 2, 6),
    ("pattern p(w: int = 2) { attend softmax over w(3) }", "'w' is a value, not a function", 1, 45),
    ("pattern p() { attend softmax over same(3) }", "same takes a name", 1, 40),
    ("pattern p(w: int = 2) { attend softmax query w }", "'w' is a value, not a stage or input", 1, 46),
    ("pattern p() { a = attend softmax\n return a\n return a }", "a pattern returns once", 3, 2),
    ("pattern p() { a = attend softmax\n attend softmax\n return a }",
     "a pattern with a return cannot also have unnamed attend stages", 2, 2),
    ("pattern p() { param t[0]\n attend softmax query t }", "at least 1 row", 1, 23),
    ("pattern p(c: int = 1) { attend softmax over if c then full else causal }",
     "the condition of `if` must be a compile-time bool, got int", 1, 48),
    ("pattern p(s: set = {1}) { attend softmax over where(i < s) }", "set cannot be used inside where(...)", 1, 57),
    ("pattern p() { attend softmax over sliding(-full) }", "cannot negate mask", 1, 44),
    ("pattern p() { attend softmax over causal + causal }", "`+` does not apply to masks", 1, 35),
    ("pattern p() { attend softmax over rows({1} < {2}) }", "`<` does not apply to sets", 1, 40),
    ("pattern p() { attend softmax over sliding(1 | 2) }", "`|` combines masks or sets, not numbers", 1, 43),
    ("pattern p() { attend softmax over sliding(2 * true) }", "`*` needs numbers, got bool", 1, 47),
    ("pattern p() { attend softmax over where(i) }", "where(...) needs a condition", 1, 41),
    ("pattern p() { attend softmax over where(sliding(i) == j) }", "sliding(...) cannot be used inside where(...)",
     1, 41),
    ("pattern p() { attend linear(favor(4, eps = 0)) }", "eps must be > 0, got 0", 1, 44),
    ("pattern p() { attend linear(favor(4, scaling = 3)) }", "scaling must be 0 (chi norms) or 1 (sqrt(d)), got 3",
     1, 48),
    ("pattern p() { attend softmax, scale = 1e308 * 10 }", "value is not finite", 1, 39),
])
def test_value_and_structure_errors(text, message, line, col):
    """The error paths of checks.py, values.py and lower.py that the table above does not reach."""
    with pytest.raises(pd.PatternError) as info:
        pd.parse(text).lower()
    assert message in info.value.message, str(info.value)
    assert (info.value.line, info.value.column) == (line, col), str(info.value)
    assert "^" in str(info.value)


def test_error_rendering_shows_file_line_and_caret(tmp_path):
    f = tmp_path / "bad.attn"
    f.write_text("# comment\npattern p() {\n    attend softmax over slidng(4)\n}\n")
    with pytest.raises(pd.PatternError) as info:
        pd.load(f)
    assert str(info.value) == (f"{f}:3:25: error: unknown function 'slidng'\n"
                               "      attend softmax over slidng(4)\n"
                               "                          ^^^^^^\n"
                               "hint: did you mean 'sliding'?")


# ---------------------------------------------------------------------------------------------- printer
@pytest.mark.parametrize("name", pd.builtins())
def test_round_trip_of_builtins(name):
    prog = pd.builtin(name)
    text = prog.to_source()
    again = pd.parse(text)
    assert again.pattern == prog.pattern
    assert again.to_source() == text
    assert again.lower() == prog.lower()


_names = st.sampled_from(["w", "d", "k"])
_ints = st.integers(0, 9).map(lambda v: ast.Num(v))


@st.composite
def exprs(draw, depth=4):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(_ints, _names.map(ast.Name), st.sampled_from([ast.Name("full"), ast.Name("causal")]),
                              st.booleans().map(ast.Bool)))
    kind = draw(st.sampled_from(["bin", "un", "call", "if", "set"]))
    sub = exprs(depth=depth - 1)
    if kind == "bin":
        op = draw(st.sampled_from(["|", "&", "+", "-", "*", "//", "%", "<", "==", "and", "or"]))
        return ast.BinOp(op, draw(sub), draw(sub))
    if kind == "un":
        return ast.UnaryOp(draw(st.sampled_from(["-", "~", "not"])), draw(sub))
    if kind == "if":
        return ast.IfExpr(draw(sub), draw(sub), draw(sub))
    if kind == "set":
        return ast.SetLit(tuple(draw(st.lists(sub, max_size=3))))
    kws = tuple(ast.Keyword("dilation", draw(sub)) for _ in range(draw(st.integers(0, 1))))
    return ast.Call("sliding", (draw(sub),), kws)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs(), exprs())
def test_round_trip_of_generated_programs(mask, norm):
    """Printing keeps the tree up to the association of `|`, `&`, `or`, `and`: the parser rebalances their
    chains (grammar/nesting.rebalance), so a generated left-leaning `0 & 0 & 0 & 0` comes back balanced.
    The parser's own (balanced) trees round-trip exactly."""
    pat = ast.Pattern("p", (ast.Param("w", "int", ast.Num(2)),), (ast.Attend(norm, mask=mask),))
    text = print_module(ast.Module((pat,)))
    again = parse_module(text)
    assert _chains(again.patterns[0]) == _chains(pat), text
    assert parse_module(print_module(again)).patterns == again.patterns, text


_REBALANCED = ("|", "&", "or", "and")


def _chains(node):
    """`node` with every chain of one rebalanced operator flattened to ("chain", op, operands)."""
    if isinstance(node, ast.BinOp) and node.op in _REBALANCED:
        operands, stack = [], [node]
        while stack:
            x = stack.pop()
            if isinstance(x, ast.BinOp) and x.op == node.op:
                stack += [x.right, x.left]
            else:
                operands.append(_chains(x))
        return ("chain", node.op, tuple(operands))
    if isinstance(node, tuple):
        return tuple(_chains(x) for x in node)
    if dataclasses.is_dataclass(node):
        return (type(node).__name__,) + tuple(_chains(getattr(node, f.name)) for f in dataclasses.fields(node)
                                              if f.compare)
    return node


# ------------------------------------------------------------------------------------------------- fuzz
def _outcome(text):
    try:
        pd.parse(text)
    except pd.PatternError as e:
        assert e.message and str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_program_or_a_pattern_error(text):
    _outcome(text)


_library = [pd.builtin(n).source.text for n in pd.builtins()]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_library), st.integers(0, 2000), st.integers(0, 40), st.text(max_size=8))
def test_mutated_library_programs(text, at, cut, insert):
    at %= len(text) + 1
    _outcome(text[:at] + insert + text[at + cut:])


@pytest.mark.parametrize("text,column", [
    ("pattern p() { attend softmax over " + "(" * 10000 + "full" + ")" * 10000 + " }", 35 + 200),
    ("pattern p() { attend softmax over " + "~" * 10000 + "full }", 35 + 200),
    ("pattern p() { attend softmax over " + "(" * 10000, 35 + 200),
], ids=["parens-10000", "complements-10000", "unclosed-10000"])
def test_deep_nesting_is_refused_where_the_limit_is_passed(text, column):
    """The 201st open bracket or unary operator is the caret, whatever follows (lark never sees the rest)."""
    with pytest.raises(pd.PatternError) as info:
        pd.parse(text)
    assert "nested too deeply" in info.value.message
    assert (info.value.line, info.value.column) == (1, column)


def test_a_long_union_chain_is_not_nesting():
    text = "pattern p() { attend softmax over " + " | ".join(["full"] * 20000) + " }"
    assert pd.parse(text).lower().stages[0].mask == M.FULL


def test_a_large_program_parses():
    """A program of ~200 KB (5000 named masks) parses and lowers to the mask it names."""
    body = "\n".join(f"    m{k} = sliding({k % 7}) | global({{{k}}})" for k in range(5000))
    text = f"pattern big() {{\n{body}\n    attend softmax over m0\n}}\n"
    assert len(text) > 190_000
    prog = pd.parse(text)
    assert prog.lower().stages[0].mask == pd.builtin("longformer").lower(window=0).stages[0].mask


def test_long_flat_chains_are_not_deep():
    """`a | b | c | ...` is a chain, not nesting: 3000 terms parse (rebalanced), and mean their union."""
    text = "pattern p() { attend softmax over " + " | ".join(f"cols({{{k}}})" for k in range(3000)) + " }"
    assert pd.parse(text).lower().stages[0].mask == M.cols(set(range(3000)))
    deep = "pattern p() { attend softmax over " + "sliding(1) & (" * 300 + "full" + ")" * 300 + " }"
    with pytest.raises(pd.PatternError, match="nested too deeply"):
        pd.parse(deep)


def test_cli_check_never_shows_a_traceback(tmp_path, capsys):
    good = tmp_path / "good.attn"
    good.write_text("pattern good() { attend softmax over causal }\npattern also(w: int = 2) { attend softmax }")
    bad = tmp_path / "bad.attn"
    bad.write_bytes(b"\x00\xff\xfe")
    run = subprocess.run([sys.executable, "-m", "patterndsl.cli", "check", str(good), "longformer", str(bad),
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "good.attn: ok - pattern good() - 1 stage" in run.stdout
    assert "good.attn: ok - pattern also(w: int = 2) - 1 stage" in run.stdout      # every pattern of a file
    assert "longformer: ok - pattern longformer(" in run.stdout
    assert "is not UTF-8 text" in run.stderr and "is a directory" in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    from patterndsl.cli import main                      # the subprocess above is the smoke test; in-process:
    assert main(["check", *pd.builtins()]) == 0
    assert capsys.readouterr().out.count(": ok - ") == len(pd.builtins())


def test_api_errors(tmp_path):
    two = tmp_path / "two.attn"
    two.write_text("pattern a() { attend softmax }\npattern b() { attend softmax }")
    cases = [(lambda: pd.load(two), f"{two} holds 2 patterns (a, b)", "choose one with pattern=NAME"),
             (lambda: pd.load(two, pattern="c"), f"no pattern 'c' in {two}", "it holds: a, b"),
             (lambda: pd.load(two, pattern="bb"), f"no pattern 'bb' in {two}", "did you mean 'b'?"),
             (lambda: pd.compile(3), "expected a Program, a built-in name, .attn text or a path, got int", None),
             (lambda: pd.builtin("longformr"), "no built-in program 'longformr'", "did you mean 'longformer'?")]
    for fn, message, hint in cases:
        with pytest.raises(pd.PatternError) as info:
            fn()
        assert info.value.message == message and info.value.hint == hint
    assert [p.name for p in pd.api.load_all(two)] == ["a", "b"]
