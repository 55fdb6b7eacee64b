"""The nesting limits of expressions, enforced while lark parses (early, at the place they are passed) and after.

Two rules, each with the limit `MAX_DEPTH` (docs/language.md §7):
- *Open*: at any point of an expression, at most MAX_DEPTH brackets (`( )`, a call's `( )`, a set's `{ }`),
  unary operators (`- ~ not`) and `if`s are open around it. `OpenLevels`, fed every token lark shifts,
  counts them from lark's value stack in O(1) amortised per token, and stops right nesting (`((((...`,
  `~~~~...`, `if a then if b then ...`) at the token that opens one too many, long before lark has built a
  tree. (Binary operators need no count here: without brackets they nest at most as deep as the precedence
  table is long.)
- *Deep*: an expression's tree is at most MAX_DEPTH operators, calls, sets and `if`s deep, after chains
  `a | b | c ...` of one of `| & and or` are balanced (parentheses inside such a chain do not break it), so
  such a chain costs log2 of its length, while a chain of another operator (`a - b - c ...`) costs one level
  per operator. `Node`, lark's tree class, knows a lower bound of its height and stops left nesting at the
  operand that passes the limit; `check_depth` measures the final tree exactly, top-down.

>>> OpenLevels().level
0
"""
from __future__ import annotations

from lark import Token, Tree

from ..errors import PatternError, Span
from .limits import MAX_DEPTH

ASSOCIATIVE = ("union_op", "inter_op", "or_op", "and_op")   # chains of these are rebalanced, not nested
LEVELS = frozenset(ASSOCIATIVE + ("not_op", "cmp_op", "add_op", "sub_op", "mul_op", "neg_op", "inv_op",
                                  "if_expr", "call", "set_lit", "int_set"))
_CARRIERS = frozenset({"paren", "kwarg"})   # no level of their own, but they hold expressions
_PREFIX = frozenset({"NOT", "TILDE", "IF"})   # and MINUS when it is unary
_OPEN = frozenset({"LPAR", "LBRACE"})
_CLOSE = frozenset({"RPAR", "RBRACE"})
WATCHED = _PREFIX | _OPEN | _CLOSE | {"MINUS", "PATTERN", "IN"}
_HINT = "split it into named values: NAME = ..."


def too_deep(span: Span, open_here: bool = False) -> PatternError:
    what = "brackets, unary operators and ifs open here" if open_here else "levels deep"
    return PatternError(f"expression nested too deeply: more than {MAX_DEPTH} {what}", span, hint=_HINT)


def _token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


class OpenLevels:
    """Counts the levels open around the last token lark shifted.

    Every token that opens a level (an opening bracket, a unary operator, `if`) adds one and every closing
    bracket takes one away, for as long as the token sits on lark's value stack (a reduction removes it).
    The brackets of a pattern's parameter list, its body and a parameter's `in {...}` choices are no
    levels. A `-` is unary when no operand (a reduced tree) sits below it on the stack."""

    def __init__(self):
        self.marks: list[tuple[int, Token, int]] = []   # (stack index, token, level after it), bottom first
        self.brackets: list[bool] = []                  # per open bracket: is it a level?
        self.in_header = False                          # the next '(' opens a parameter list
        self.after_header = False                       # the next '{' opens a pattern body
        self.after_in = False                           # the next '{' opens choices
        self.level = 0

    def shifted(self, tok: Token, value_stack: list) -> None:
        """Account for `tok`, just shifted onto `value_stack`; raise if it opens one level too many."""
        top = len(value_stack) - 1
        marks = self.marks
        while marks and (marks[-1][0] >= top or value_stack[marks[-1][0]] is not marks[-1][1]):
            marks.pop()
        base = marks[-1][2] if marks else 0
        delta = self._delta(tok)
        if tok.type == "MINUS" and top and isinstance(value_stack[top - 1], Tree):
            delta = 0   # binary minus
        self.level = base + delta
        if delta:
            marks.append((top, tok, self.level))
        if delta > 0 and self.level > MAX_DEPTH:
            raise too_deep(_token_span(tok), open_here=True)

    def _delta(self, tok: Token) -> int:
        kind = tok.type
        if kind == "PATTERN":
            self.in_header = True
            return 0
        header, self.in_header = self.in_header and kind == "LPAR", self.in_header and kind != "LPAR"
        if kind == "IN":
            self.after_in = True
            return 0
        if kind in _OPEN:
            counted = not header and not (kind == "LBRACE" and (self.after_in or self.after_header))
            self.after_in = self.after_header = False
            self.brackets.append(counted)
            return 1 if counted else 0
        if kind in _CLOSE:
            counted = self.brackets.pop() if self.brackets else False
            self.after_header = kind == "RPAR" and not counted and not self.brackets
            return -1 if counted else 0
        return 1 if kind in _PREFIX or kind == "MINUS" else 0


class Node(Tree):
    """A lark tree node that knows a lower bound of its height in levels (exact unless a chain is rebalanced
    later) and refuses to be built deeper than MAX_DEPTH."""

    __slots__ = ("depth",)

    def __init__(self, data, children, meta=None):
        super().__init__(data, children, meta)
        self.depth = 0
        if data not in LEVELS and data not in _CARRIERS:   # statements, leaves, lark's list helpers
            return
        if data in ASSOCIATIVE and getattr(_unparen(children[0]), "data", None) == data:  # a chain: balanced later
            right = children[-1].depth if isinstance(children[-1], Node) else 0
            self.depth = max(children[0].depth, right + 1)
        else:
            self.depth = max((c.depth for c in children if isinstance(c, Node)), default=0) + (data in LEVELS)
        if self.depth > MAX_DEPTH:
            raise too_deep(_start(children[-1]))


def _unparen(x):
    while isinstance(x, Tree) and x.data == "paren":
        x = x.children[0]
    return x


def _start(x) -> Span:
    if isinstance(x, Token):
        return _token_span(x)
    meta = getattr(x, "meta", None)
    if meta is None or getattr(meta, "empty", True):
        return Span(1, 1)
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def rebalance(tree: Tree) -> Tree:
    """Left-leaning chains of one associative operator (`a | b | c | ...`, as the LALR grammar builds them,
    `(a | b) | c` included) become balanced trees, so a long flat union is log-deep. Iterative."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for k, child in enumerate(node.children):
            if not isinstance(child, Tree):
                continue
            if child.data in ASSOCIATIVE and getattr(_unparen(child.children[0]), "data", None) == child.data:
                operands, spine = [], child
                while isinstance(spine, Tree) and spine.data == child.data:
                    operands.append(spine.children[1])
                    spine = _unparen(spine.children[0])
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


def check_depth(tree: Tree) -> None:
    """The *deep* rule on the final tree, exactly and top-down: the first node more than MAX_DEPTH levels
    down is reported (iterative, so no recursion limit applies)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        depth += node.data in LEVELS
        if depth > MAX_DEPTH:
            raise too_deep(_start(node))
        stack.extend((c, depth) for c in node.children if isinstance(c, Tree))
