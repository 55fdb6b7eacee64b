"""The `.attn` parser: lark (LALR) text -> frozen AST dataclasses with source spans; errors with a caret.

>>> m = parse_module("pattern p(w: int = 2) { attend softmax over sliding(w) }")
>>> m.patterns[0].body[0].mask
Call(func='sliding', args=(Name(id='w'),), kwargs=())
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import PatternError, Source, Span, did_you_mean
from . import ast

MAX_DEPTH = 200  # nesting limit of expressions; deeper programs get a PatternError, never a RecursionError


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = (Path(__file__).parent / "attn.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _span(meta_or_tok) -> Span:
    m = meta_or_tok
    if getattr(m, "empty", False):
        return Span(1, 1)
    return Span(m.line, m.column, getattr(m, "end_line", None), getattr(m, "end_column", None))


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s[1:-1])


@v_args(meta=True)
class _Build(Transformer):
    """One method per grammar rule, each building an AST node with its span."""

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
        return ast.TensorParam(str(items[0]), items[1], _span(items[0]))

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
        text = str(items[0])
        value = int(text) if re.fullmatch(r"\d+", text) else float(text)
        return ast.Num(value, _span(items[0]))

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

    def arg(self, meta, items):
        return items[0]

    def set_lit(self, meta, items):
        return ast.SetLit(tuple(x for x in items if x is not None), _span(meta))


_READABLE = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string", "CMP": "a comparison",
             "MULOP": "'*', '/', '//' or '%'", "$END": "the end of the file"}


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
        return PatternError(f"unexpected character {ch!r}", Span(e.line, e.column, e.line, e.column + 1),
                            hint=_expected(e.allowed) if e.allowed else None)
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        lines = text.splitlines() or [""]
        return PatternError("unexpected end of file", Span(len(lines), len(lines[-1]) + 1),
                            hint=_expected(e.expected))
    tok = e.token
    return PatternError(f"unexpected {str(tok)!r}", Span(tok.line, tok.column, tok.end_line, tok.end_column),
                        hint=_expected(e.expected))


ASSOCIATIVE = ("union_op", "inter_op", "or_op", "and_op")   # chains of these are rebalanced, not nested


def _rebalance(tree: Tree) -> Tree:
    """Left-leaning chains of one associative operator (`a | b | c | ...`, as the LALR grammar builds them)
    become balanced trees, so a long flat union is log-deep, not as deep as it is long. Iterative."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for k, child in enumerate(node.children):
            if not isinstance(child, Tree):
                continue
            if child.data in ASSOCIATIVE and isinstance(child.children[0], Tree) \
                    and child.children[0].data == child.data:
                operands, spine = [], child
                while isinstance(spine, Tree) and spine.data == child.data:
                    operands.append(spine.children[1])
                    spine = spine.children[0]
                operands.append(spine)
                node.children[k] = child = _balanced(child.data, operands[::-1], child.meta)
            stack.append(child)
    return tree


def _balanced(data: str, operands: list, meta) -> Tree:
    """A balanced tree of `data` over `operands` (left to right), built bottom-up."""
    level = list(operands)
    while len(level) > 1:
        pairs = [Tree(data, [level[i], level[i + 1]], meta) for i in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    return level[0]


def _check_depth(tree: Tree) -> None:
    """Bound the tree depth iteratively, before the recursive transformer sees it."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            meta = node.meta if isinstance(node, Tree) else node
            raise PatternError(f"expression nested too deeply (limit {MAX_DEPTH} levels)", _span(meta),
                               hint="split it into named values: local = ...")
        if isinstance(node, Tree):
            stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))


def parse_module(text: str, name: str = "<string>") -> ast.Module:
    """Parse `.attn` text into an `ast.Module`; syntax errors are PatternErrors pointing at the token."""
    source = Source(text, name)
    try:
        tree = _rebalance(_lark().parse(text))
        _check_depth(tree)
        module = _Build().transform(tree)
    except UnexpectedInput as e:
        raise _syntax_error(e, text).with_source(source) from None
    except VisitError as e:
        if isinstance(e.orig_exc, PatternError):
            raise e.orig_exc.with_source(source) from None
        raise
    except PatternError as e:
        raise e.with_source(source) from None
    except RecursionError:
        raise PatternError(f"program nested too deeply (limit {MAX_DEPTH} levels)", Span(1, 1),
                           source=source) from None
    return ast.Module(module.patterns, source)
