"""Static checks of a parsed module: names, calls, sources, the stage graph and returns.

Checks that need parameter values (a negative window, overlapping heads, the type of an `if` branch
taken) run in the lowering, which reports them at the same source positions.
"""
from __future__ import annotations

from ..errors import PatternError, did_you_mean
from . import ast
from .signatures import CONSTANTS, INDEX_VARS, INPUT, OPTIONS, SCORE_FUNCS, SCORE_VARS, SIGNATURES


def check_module(module: ast.Module) -> None:
    """Raise the first PatternError found in `module` (spanned; the public entry attaches the source)."""
    if not module.patterns:
        raise PatternError("no pattern in this file", None, hint="a file holds `pattern NAME(...) { ... }`")
    seen: dict[str, ast.Pattern] = {}
    for p in module.patterns:
        if p.name in seen:
            raise PatternError(f"pattern '{p.name}' is defined twice", p.span)
        seen[p.name] = p
        _Checker(p).run()


class _Checker:
    def __init__(self, pattern: ast.Pattern):
        self.p = pattern
        self.params = {}
        self.values: set[str] = set()      # NAME = expr
        self.stages: dict[str, ast.Attend] = {}
        self.tensors: set[str] = set()     # param p[...]
        self.tables: set[str] = set()      # param t[heads, width]: bias tables

    def run(self) -> None:
        for prm in self.p.params:
            if prm.name in self.params:
                raise PatternError(f"parameter '{prm.name}' is declared twice", prm.span)
            if prm.default is not None:
                self.expr(prm.default, where=False)
            self.params[prm.name] = prm
        self.collect()
        for st in self.p.body:
            if isinstance(st, ast.Let) and not isinstance(st.value, ast.Attend):
                self.expr(st.value, where=False)
                self.values.add(st.name)
            elif isinstance(st, ast.TensorParam):
                self.expr(st.length, where=False)
                if st.width is not None:
                    self.expr(st.width, where=False)
            elif isinstance(st, (ast.Let, ast.Attend)):
                self.attend(st.value if isinstance(st, ast.Let) else st)
        self.outputs()

    def collect(self) -> None:
        """Stage and tensor names first: stages may be referenced before their statement."""
        names: dict[str, object] = {}
        for st in self.p.body:
            name = st.name if isinstance(st, (ast.Let, ast.TensorParam)) else None
            if name is None:
                continue
            if name in names or name in self.params:
                raise PatternError(f"'{name}' is defined twice", st.span)
            if name == INPUT:
                raise PatternError(f"'{INPUT}' is the op's input and cannot be redefined", st.span)
            names[name] = st
            if isinstance(st, ast.TensorParam):
                (self.tables if st.width is not None else self.tensors).add(name)
            elif isinstance(st.value, ast.Attend):
                self.stages[name] = st.value

    # ---------------------------------------------------------------------------------------- expressions
    def known(self) -> list[str]:
        return list(self.params) + sorted(self.values) + list(CONSTANTS)

    def expr(self, e: ast.Expr, where: bool | str) -> None:
        """Check names and calls; `where` is True inside where(...), "bias" inside a bias (i, j, h visible)."""
        stack = [e]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Name):
                self.name(node, where)
            elif isinstance(node, ast.Call):
                self.call(node, where)
                inner = True if node.func == "where" else where
                if node.func in ("same", "nested", "t5_bias"):
                    continue
                for a in list(node.args) + [k.value for k in node.kwargs]:
                    self.expr(a, inner)
            elif isinstance(node, ast.SetLit):
                stack.extend(reversed(node.items))
            elif isinstance(node, ast.BinOp):
                stack.extend((node.right, node.left))  # report problems in source order
            elif isinstance(node, ast.UnaryOp):
                stack.append(node.operand)
            elif isinstance(node, ast.IfExpr):
                stack.extend((node.other, node.then, node.cond))

    def name(self, n: ast.Name, where: bool) -> None:
        if n.id in self.params or n.id in self.values or n.id in CONSTANTS:
            return
        if where == "bias" and n.id in SCORE_VARS:
            return
        if n.id in INDEX_VARS:
            if where:
                return
            raise PatternError(f"`{n.id}` only means something inside where(...) or a bias", n.span,
                               hint="write the condition as where(...), or the score term as `, bias = ...`")
        if n.id == "h":
            raise PatternError("`h` (the head) only means something inside a bias", n.span,
                               hint="write the score term as `, bias = ...`")
        if n.id in SIGNATURES:
            raise PatternError(f"'{n.id}' needs arguments", n.span, hint=SIGNATURES[n.id].describe())
        if n.id in self.stages or n.id in self.tensors or n.id in self.tables or n.id == INPUT:
            raise PatternError(f"'{n.id}' is a tensor source, not a value", n.span,
                               hint="sources go after `query` or `keys`")
        raise PatternError(f"unknown name '{n.id}'", n.span,
                           hint=did_you_mean(n.id, self.known() + (list(INDEX_VARS) if where else [])))

    def call(self, c: ast.Call, where: bool) -> None:
        sig = SIGNATURES.get(c.func)
        if sig is None:
            if c.func in self.params or c.func in self.values:
                raise PatternError(f"'{c.func}' is a value, not a function", c.span)
            raise PatternError(f"unknown function '{c.func}'", c.span, hint=did_you_mean(c.func, SIGNATURES))
        if len(c.args) > len(sig.args):
            raise PatternError(f"{c.func} takes {len(sig.args)} argument{'s' * (len(sig.args) != 1)}, "
                               f"got {len(c.args) + len(c.kwargs)}", c.args[len(sig.args)].span,
                               hint=sig.describe())
        names = [a.name for a in sig.args]
        given = set(names[:len(c.args)])
        for k in c.kwargs:
            if k.name not in names:
                raise PatternError(f"{c.func} has no argument '{k.name}'", k.span,
                                   hint=did_you_mean(k.name, names) or sig.describe())
            if k.name in given:
                raise PatternError(f"argument '{k.name}' of {c.func} is given twice", k.span)
            given.add(k.name)
        missing = [a.name for a in sig.args if a.required and a.name not in given]
        if missing:
            raise PatternError(f"{c.func} is missing its argument '{missing[0]}'", c.span, hint=sig.describe())
        if c.func == "where" and where:
            raise PatternError("where(...) cannot be nested inside " + ("a bias" if where == "bias" else "where(...)"),
                               c.span, hint="masks go in `over`; a bias is a number per pair" if where == "bias"
                               else None)
        if c.func in SCORE_FUNCS and where != "bias":
            raise PatternError(f"{c.func}(...) is a score term: it only means something inside a bias", c.span,
                               hint=f"write it as `, bias = {c.func}(...)`")
        if c.func == "t5_bias":
            arg = c.args[0] if c.args else next(k.value for k in c.kwargs if k.name == "table")
            if not (isinstance(arg, ast.Name) and arg.id in self.tables):
                got = arg.id if isinstance(arg, ast.Name) else "an expression"
                name = arg.id if isinstance(arg, ast.Name) else "rel"
                raise PatternError(f"t5_bias(...) reads a bias table `param NAME[heads, buckets]`, got {got}",
                                   arg.span, hint=did_you_mean(got, self.tables)
                                   or f"declare it first: param {name}[heads, 32]")
        if c.func in ("same", "nested"):
            arg = c.args[0] if c.args else c.kwargs[0].value
            if not isinstance(arg, ast.Name):
                raise PatternError(f"{c.func} takes a name", arg.span)
            if c.func == "nested" and arg.id in self.tables:
                raise PatternError(f"'{arg.id}' is a bias table, nested(...) needs packed queries `param "
                                   f"{arg.id}[length]`", arg.span)
            if c.func == "nested" and arg.id not in self.tensors:
                raise PatternError(f"nested(...) needs a tensor param, '{arg.id}' is not one", arg.span,
                                   hint=did_you_mean(arg.id, self.tensors) or f"declare it: param {arg.id}[16]")
            if c.func == "same" and (arg.id in self.params or arg.id in self.values or arg.id in self.stages
                                     or arg.id in self.tensors or arg.id == INPUT):
                raise PatternError(f"same(...) takes the name of a runtime input; '{arg.id}' is already defined",
                                   arg.span, hint="pick a fresh name, e.g. same(segments), and pass segments=...")

    # -------------------------------------------------------------------------------------------- stages
    def attend(self, a: ast.Attend) -> None:
        self.expr(a.normaliser, where=False)
        if a.mask is not None:
            self.expr(a.mask, where=False)
        for src in (a.query, a.keys):
            if src is None or src.id == INPUT or src.id in self.stages or src.id in self.tensors:
                continue
            if src.id in self.tables:
                raise PatternError(f"'{src.id}' is a bias table, not a source of queries or keys", src.span,
                                   hint=f"read it in a bias: , bias = t5_bias({src.id})")
            if src.id in self.params or src.id in self.values:
                raise PatternError(f"'{src.id}' is a value, not a stage or input", src.span)
            raise PatternError(f"unknown stage '{src.id}'", src.span,
                               hint=did_you_mean(src.id, list(self.stages) + list(self.tensors) + [INPUT]))
        seen = set()
        for opt in a.options:
            if opt.name not in OPTIONS:
                raise PatternError(f"unknown option '{opt.name}'", opt.span,
                                   hint=did_you_mean(opt.name, OPTIONS) or f"options: {', '.join(OPTIONS)}")
            if opt.name in seen:
                raise PatternError(f"option '{opt.name}' is given twice", opt.span)
            seen.add(opt.name)
            self.expr(opt.value, where="bias" if opt.name == "bias" else False)
        if a.heads is not None:
            self.expr(a.heads.start, where=False)
            self.expr(a.heads.stop, where=False)

    def outputs(self) -> None:
        body = self.p.body
        returns = [s for s in body if isinstance(s, ast.Return)]
        anonymous = [s for s in body if isinstance(s, ast.Attend)]
        if not self.stages and not anonymous:
            raise PatternError(f"pattern '{self.p.name}' has no attend stage", self.p.span,
                               hint="add one, e.g. attend softmax over causal")
        if len(returns) > 1:
            raise PatternError("a pattern returns once", returns[1].span)
        if returns and body[-1] is not returns[0]:
            raise PatternError("return must be the last statement", returns[0].span)
        for r in returns:
            for n in r.names:
                if n.id not in self.stages:
                    what = "a tensor param" if n.id in self.tensors else None
                    raise PatternError(f"return names '{n.id}', which is not a named stage"
                                       + (f" ({what})" if what else ""), n.span,
                                       hint=did_you_mean(n.id, self.stages))
        with_heads = [a for a in anonymous if a.heads is not None]
        if with_heads and len(with_heads) != len(anonymous):
            bad = next(a for a in anonymous if a.heads is None)
            raise PatternError("some unnamed stages have heads[...] and this one has none", bad.span,
                               hint="give every unnamed stage a heads[a:b] range")
        if len(anonymous) > 1 and not with_heads:
            raise PatternError("several unnamed attend stages", anonymous[1].span,
                               hint="give them heads[a:b] ranges, or name them and return one")
        if anonymous and returns:
            raise PatternError("a pattern with a return cannot also have unnamed attend stages", anonymous[0].span,
                               hint="name the stage: out = attend ...")
        self.cycles()

    def cycles(self) -> None:
        deps = {n: [s.id for s in (a.query, a.keys) if s is not None and s.id in self.stages]
                for n, a in self.stages.items()}
        state: dict[str, int] = {}
        for start in deps:
            stack = [(start, iter(deps[start]))]
            path = [start]
            state[start] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                elif state.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [nxt]
                    raise PatternError(f"stages form a cycle: {' -> '.join(cycle)}", self.stages[nxt].span)
                elif state.get(nxt) is None:
                    state[nxt] = 1
                    stack.append((nxt, iter(deps[nxt])))
                    path.append(nxt)
