"""The `.attn` parser: lark (LALR) text -> frozen AST dataclasses with source spans; errors with a caret.

>>> m = parse_module("pattern p(w: int = 2) { attend softmax over sliding(w) }")
>>> m.patterns[0].body[0].mask
Call(func='sliding', args=(Name(id='w'),), kwargs=())
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..errors import PatternError, Source, Span, did_you_mean
from . import ast
from .limits import INT_LIMIT, float_literal, int_literal
from .nesting import WATCHED, Node, OpenLevels, check_depth, rebalance


_DIGITS = re.compile(r"[0-9]+")


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = (Path(__file__).parent / "attn.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, tree_class=Node)


def _span(meta_or_tok) -> Span:
    m = meta_or_tok
    if getattr(m, "empty", False):
        return Span(1, 1)
    return Span(m.line, m.column, getattr(m, "end_line", None), getattr(m, "end_column", None))


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s[1:-1])


class _Build:
    """One method per grammar rule, each building an AST node with its span (called by `_transform`)."""

    def start(self, meta, items):
        return ast.Module(tuple(items))

    def pattern(self, meta, items):
        name, *rest = items
        params = tuple(p for p in rest if isinstance(p, ast.Param))
        body = tuple(s for s in rest if s is not None and not isinstance(s, (ast.Param, Token)))
        return ast.Pattern(str(name), params, body, _span(name))

    def param(self, meta, items):
        name, typ, choices, default = items
        if str(typ) not in ast.PARAM_TYPES:
            raise PatternError(f"unknown type '{typ}' for parameter '{name}'", _span(typ),
                               hint=did_you_mean(str(typ), ast.PARAM_TYPES) or
                               f"types are {', '.join(ast.PARAM_TYPES)}")
        return ast.Param(str(name), str(typ), default, _span(name), choices)

    def choices(self, meta, items):
        return tuple(items)

    def empty(self, meta, items):
        return None

    def heads(self, meta, items):
        return ast.HeadRange(items[0], items[1], _span(meta))

    def attend_stmt(self, meta, items):
        heads, att = items
        return ast.Attend(att.normaliser, att.query, att.keys, att.mask, att.options, heads, att.span)

    def attend(self, meta, items):
        norm, *rest = items
        fields = {"query": None, "keys": None, "mask": None}
        options = []
        for kind, value, span in rest:
            if kind == "option":
                options.append(value)
                continue
            if fields[kind] is not None:
                word = "over" if kind == "mask" else kind
                raise PatternError(f"`{word}` is given twice in one attend", span,
                                   hint=f"an attend takes one `{word}` clause")
            fields[kind] = value
        return ast.Attend(norm, fields["query"], fields["keys"], fields["mask"], tuple(options), None, _span(meta))

    def query_clause(self, meta, items):
        return ("query", items[0], _span(meta))

    def keys_clause(self, meta, items):
        return ("keys", items[0], _span(meta))

    def over_clause(self, meta, items):
        return ("mask", items[0], _span(meta))

    def option(self, meta, items):
        name, value = items
        return ("option", ast.Option(str(name), value, _span(name)), _span(name))

    def let_attend(self, meta, items):
        return ast.Let(str(items[0]), items[1], _span(items[0]))

    let_value = let_attend

    def tensor_stmt(self, meta, items):
        return ast.TensorParam(str(items[0]), items[1], _span(items[0]), items[2] if len(items) > 2 else None)

    def return_stmt(self, meta, items):
        return ast.Return(tuple(items), _span(meta))

    # expressions
    def if_expr(self, meta, items):
        return ast.IfExpr(items[0], items[1], items[2], _span(meta))

    def _bin(op):
        def build(self, meta, items):
            return ast.BinOp(op, items[0], items[1], _span(meta))
        return build

    or_op, and_op, union_op, inter_op, add_op, sub_op = map(_bin, ["or", "and", "|", "&", "+", "-"])

    def cmp_op(self, meta, items):
        return ast.BinOp(str(items[1]), items[0], items[2], _span(meta))

    mul_op = cmp_op

    def not_op(self, meta, items):
        return ast.UnaryOp("not", items[0], _span(meta))

    def neg_op(self, meta, items):
        return ast.UnaryOp("-", items[0], _span(meta))

    def inv_op(self, meta, items):
        return ast.UnaryOp("~", items[0], _span(meta))

    def number(self, meta, items):
        text, span = str(items[0]), _span(items[0])
        value = int_literal(text, span) if text.isdigit() else float_literal(text, span)
        return ast.Num(value, span)

    def int_set(self, meta, items):
        """`{0, 5, 9}` lexed as one token: its elements, each with its own span."""
        tok, nums = items[0], []
        short = len(str(INT_LIMIT)) - 1   # digits that are surely below the limit
        for k, text in enumerate(tok.value.split("\n")):
            line, shift = tok.line + k, (tok.column if k == 0 else 1)
            for m in _DIGITS.finditer(text):
                a, b = m.span()
                span = Span(line, a + shift, line, b + shift)
                digits = m.group()
                nums.append(ast.Num(int(digits) if b - a <= short else int_literal(digits, span), span))
        return ast.SetLit(tuple(nums), _span(tok))

    def paren(self, meta, items):
        return items[0]

    def true(self, meta, items):
        return ast.Bool(True, _span(meta))

    def false(self, meta, items):
        return ast.Bool(False, _span(meta))

    def string(self, meta, items):
        return ast.Str(_unescape(str(items[0])), _span(items[0]))

    def name(self, meta, items):
        return ast.Name(str(items[0]), _span(items[0]))

    def call(self, meta, items):
        func, *args = items
        args = [a for a in args if a is not None]
        pos = tuple(a for a in args if not isinstance(a, ast.Keyword))
        kws = tuple(a for a in args if isinstance(a, ast.Keyword))
        for a in args[len(pos):]:
            if not isinstance(a, ast.Keyword):
                raise PatternError("a positional argument follows a keyword argument", a.span,
                                   hint="put positional arguments first")
        seen = set()
        for k in kws:
            if k.name in seen:
                raise PatternError(f"keyword argument '{k.name}' is given twice", k.span)
            seen.add(k.name)
        return ast.Call(str(func), pos, kws, _span(func))

    def kwarg(self, meta, items):
        return ast.Keyword(str(items[0]), items[1], _span(items[0]))

    def set_lit(self, meta, items):
        return ast.SetLit(tuple(x for x in items if x is not None), _span(meta))


_READABLE = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string", "CMP": "a comparison",
             "MULOP": "'*', '/', '//' or '%'", "INTSET": "'{'", "$END": "the end of the file"}


def _expected(names) -> str:
    lark = _lark()
    shown = []
    for n in sorted(set(names)):
        if n in _READABLE:
            shown.append(_READABLE[n])
            continue
        try:
            pat = lark.get_terminal(n).pattern
            shown.append(f"'{pat.value}'" if pat.type == "str" else n.lower())
        except KeyError:
            shown.append(n.lower())
    shown = sorted(set(shown))
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return "expected " + ", ".join(shown)


def _syntax_error(e: UnexpectedInput, text: str) -> PatternError:
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else "?"
        hint = _expected(e.allowed) if e.allowed else None
        if not ch.isascii() and (ch.isdigit() or ch.isnumeric()):
            hint = "numbers are written with the ASCII digits 0-9"
        elif not ch.isascii() and ch.isalpha():
            hint = "names are ASCII: letters A-Z, a-z, digits and _"
        return PatternError(f"unexpected character {ch!r}", Span(e.line, e.column, e.line, e.column + 1), hint=hint)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        lines = text.splitlines() or [""]
        return PatternError("unexpected end of file", Span(len(lines), len(lines[-1]) + 1),
                            hint=_expected(e.expected))
    tok = e.token
    return PatternError(f"unexpected {str(tok)!r}", Span(tok.line, tok.column, tok.end_line, tok.end_column),
                        hint=_expected(e.expected))


def _parse_tree(text: str) -> Tree:
    """lark's LALR loop (as `Lark.parse` runs it), with the nesting limits checked at every token."""
    parser = _lark().parse_interactive(text)
    state, levels, tok = parser.parser_state, OpenLevels(), None
    for tok in parser.lexer_thread.lex(state):
        state.feed_token(tok)
        if tok.type in WATCHED:
            levels.shifted(tok, state.value_stack)
    end = Token.new_borrow_pos("$END", "", tok) if tok is not None else Token("$END", "", 0, 1, 1)
    return state.feed_token(end, True)


def _transform(tree: Tree):
    """The AST of a lark tree: `_Build`'s method per rule, bottom-up, without recursion."""
    build, out = _Build(), []
    stack: list = [(tree, False)]
    while stack:
        node, ready = stack.pop()
        if not isinstance(node, Tree):
            out.append(node)
        elif not ready:
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(node.children))
        else:
            n = len(node.children)
            items = out[len(out) - n:]
            del out[len(out) - n:]
            out.append(getattr(build, node.data)(node.meta, items))
    return out[0]


def parse_module(text: str, name: str = "<string>") -> ast.Module:
    """Parse `.attn` text into an `ast.Module`; syntax errors are PatternErrors pointing at the token (the
    public entry, `patterndsl.api`, attaches the source to them)."""
    try:
        tree = rebalance(_parse_tree(text))
    except UnexpectedInput as e:
        raise _syntax_error(e, text) from None
    check_depth(tree)
    module = _transform(tree)
    return ast.Module(module.patterns, Source(text, name))
