"""A Pygments lexer for `.attn` programs, so docs and `pygmentize` highlight them.

Registered as the `attn` entry point in pyproject.toml (`pygmentize -l attn file.attn`). The word lists come
from the language's own tables (`grammar/signatures.py`), so new built-ins highlight without edits here.

>>> from pygments import highlight
>>> from pygments.formatters import NullFormatter
>>> highlight("pattern p() { attend softmax over causal }", AttnLexer(), NullFormatter()).strip()
'pattern p() { attend softmax over causal }'
"""
from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import (Comment, Keyword, Name, Number, Operator, Punctuation, String, Text,
                            Whitespace)

from .grammar.signatures import CONSTANTS, INDEX_VARS, INPUT, KEYWORDS, OPTIONS, SIGNATURES

_PARAM_TYPES = ("int", "float", "bool", "set", "str")
_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_STATEMENT = tuple(k for k in KEYWORDS if k not in ("true", "false", "and", "or", "not", "pattern", "param"))


class AttnLexer(RegexLexer):
    """Highlights `.attn` attention patterns: keywords, built-in masks and feature maps, parameters, numbers."""

    name = "Attn"
    aliases = ["attn", "patterndsl"]
    filenames = ["*.attn"]
    mimetypes = ["text/x-attn"]
    url = "https://github.com/patterndsl/patterndsl"

    tokens = {
        "root": [
            (r"\s+", Whitespace),
            (r"#.*?$", Comment.Single),
            (r"(pattern)(\s+)(" + _WORD + ")", bygroups(Keyword.Declaration, Whitespace, Name.Function)),
            (r"(param)(\s+)(" + _WORD + ")", bygroups(Keyword.Declaration, Whitespace, Name.Variable)),
            (r"(" + _WORD + r")(\s*)(:)(\s*)(" + "|".join(_PARAM_TYPES) + r")\b",
             bygroups(Name.Variable, Whitespace, Punctuation, Whitespace, Keyword.Type)),
            (r"(" + "|".join(OPTIONS) + r")(\s*)(=)(?!=)", bygroups(Name.Attribute, Whitespace, Operator)),
            (words(("true", "false"), suffix=r"\b"), Keyword.Constant),
            (words(("and", "or", "not"), suffix=r"\b"), Operator.Word),
            (words(_STATEMENT, suffix=r"\b"), Keyword),
            (words(tuple(SIGNATURES), suffix=r"(?=\s*\()"), Name.Builtin),     # built-in calls: sliding(...)
            (words(tuple(CONSTANTS), suffix=r"\b"), Name.Builtin),             # bare: causal, full, softmax
            (words((INPUT,) + INDEX_VARS, suffix=r"\b"), Name.Builtin.Pseudo),
            (r"(" + _WORD + r")(\s*)(=)(?!=)", bygroups(Name.Variable, Text, Operator)),
            (_WORD, Name),
            (r"[0-9]+\.[0-9]*([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+", Number.Float),
            (r"[0-9]+", Number.Integer),   # ASCII digits only, as the grammar
            (r'"(\\\\|\\"|[^"\n])*"', String.Double),
            (r"'(\\\\|\\'|[^'\n])*'", String.Single),
            (r"//|==|!=|<=|>=|[-+*/%<>|&~=]", Operator),
            (r"[(){}\[\],:;.]", Punctuation),
        ],
    }

    def analyse_text(text):  # noqa: N805  (Pygments calls it unbound)
        return 0.3 if "attend " in text and "pattern " in text else 0.0
