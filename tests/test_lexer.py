"""The Pygments lexer: every built-in and example highlights with no Error tokens, and the main token kinds
come out as intended."""
from importlib import metadata
from pathlib import Path

import pytest
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.token import Comment, Error, Keyword, Name, Number, Operator, String

from patterndsl.lexer import AttnLexer

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "patterndsl" / "library").glob("*.attn")) + sorted((ROOT / "examples").glob("*.attn"))

EVERYTHING = '''# every construct of the language
pattern all(window: int = 512, d: int = 1, g: set = {0, 5}, s: str = "ids", f: float = 1e-4, c: bool = false) {
    param p[16]
    near = sliding(window // 2, dilation = d) | global(g) - rows({1}) & ~causal
    packed = attend softmax query p keys input
    heads[0:2] attend softmax over near | where(abs(i - j) % 3 == 0 and not (i >= j) or min(i, j) != 2), scale = 0.125
    heads[2:4] attend linear(favor(64, orthogonal = true, eps = .5)) over full, causal = c
    out = attend softmax over if c then causal else full
    return out, packed
}
'''


def _tokens(text):
    return [(t, v) for t, v in AttnLexer().get_tokens(text) if v.strip()]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_files_have_no_error_tokens(path):
    text = path.read_text()
    errors = [v for t, v in AttnLexer().get_tokens(text) if t in Error]
    assert not errors, f"{path.name}: {errors}"
    assert "<span" in highlight(text, AttnLexer(), HtmlFormatter())


def test_builtins_are_present_when_the_library_lands():
    if not (ROOT / "patterndsl" / "library").exists() or not list((ROOT / "patterndsl" / "library").glob("*.attn")):
        pytest.skip("the built-in library has not landed")
    assert len([p for p in FILES if p.parent.name == "library"]) >= 10


def test_token_kinds():
    toks = _tokens(EVERYTHING)
    assert not [v for t, v in toks if t in Error]
    kinds = dict((v, t) for t, v in reversed(toks))   # first occurrence of each text
    assert kinds["# every construct of the language"] in Comment
    assert kinds["pattern"] in Keyword.Declaration and kinds["all"] in Name.Function
    assert kinds["window"] in Name.Variable and kinds["int"] in Keyword.Type
    assert kinds["sliding"] in Name.Builtin and kinds["causal"] in Name.Builtin
    assert kinds["attend"] in Keyword and kinds["heads"] in Keyword and kinds["over"] in Keyword
    assert kinds["scale"] in Name.Attribute
    assert kinds["and"] in Operator.Word and kinds["//"] in Operator
    assert kinds["1e-4"] in Number.Float and kinds[".5"] in Number.Float and kinds["512"] in Number.Integer
    assert kinds['"ids"'] in String
    assert kinds["i"] in Name.Builtin.Pseudo and kinds["input"] in Name.Builtin.Pseudo
    assert kinds["true"] in Keyword.Constant


def test_parameter_named_like_a_builtin_is_not_a_builtin():
    toks = _tokens("pattern p(window: int = 4) { attend softmax over sliding(window) }")
    assert [t for t, v in toks if v == "window"] == [Name.Variable, Name]


def test_option_causal_is_an_attribute():
    toks = _tokens("pattern p() { attend softmax over full, causal = true }")
    assert [t for t, v in toks if v == "causal"] == [Name.Attribute]


def test_entry_point_registered():
    try:
        eps = metadata.entry_points(group="pygments.lexers")
    except Exception:  # pragma: no cover
        pytest.skip("no entry point metadata")
    attn = [ep for ep in eps if ep.name == "attn"]
    if not attn:
        pytest.skip("patterndsl is not pip-installed here (entry points come from `pip install -e .`)")
    assert attn[0].value == "patterndsl.lexer:AttnLexer"
    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
    assert isinstance(get_lexer_by_name("attn"), AttnLexer)
    assert isinstance(get_lexer_for_filename("x.attn"), AttnLexer)


def test_pyproject_declares_the_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'attn = "patterndsl.lexer:AttnLexer"' in text


def test_doctests():
    import doctest
    import patterndsl.lexer
    res = doctest.testmod(patterndsl.lexer)
    assert res.failed == 0 and res.attempted > 0


def test_only_ascii_digits_are_numbers():
    """As in the grammar: Arabic-Indic or full-width digits are not numbers."""
    kinds = dict((v, t) for t, v in _tokens("sliding(3) sliding(\u0663) sliding(\uff13)"))
    assert kinds["3"] in Number
    assert kinds["\u0663"] not in Number and kinds["\uff13"] not in Number
