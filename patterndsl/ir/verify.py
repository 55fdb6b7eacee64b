"""The IR verifier: invariants every pass must keep. A failure is a compiler bug, not a user error.

>>> from patterndsl.ir.program import ProgramIR, Stage, Softmax
>>> verify(ProgramIR("p", (Stage("a", Softmax(), query="b"),), ("a",)))
Traceback (most recent call last):
...
patterndsl.ir.verify.IRError: stage 'a' reads 'b' before it is computed
"""
from __future__ import annotations

from . import mask as M
from .program import INPUT, Linear, Nested, ProgramIR, Softmax


class IRError(AssertionError):
    """A broken IR invariant (an internal error: the front end should have reported a PatternError)."""


def _check(cond: bool, msg: str):
    if not cond:
        raise IRError(msg)


def verify_mask(m: M.Mask) -> None:
    """Each node's own invariants (`Mask.problems`, defined with the node)."""
    for node in M.walk(m):
        for problem in node.problems():
            raise IRError(problem)


def verify(prog: ProgramIR) -> None:
    """Check a program's invariants; raise IRError on the first broken one."""
    seen = {INPUT} | {name for name, _ in prog.params}
    _check(len(seen) == 1 + len(prog.params), "duplicate param names")
    for name, length in prog.params:
        _check(length >= 1, f"param {name} has {length} rows")
    for st in prog.stages:
        _check(st.name not in seen, f"stage name '{st.name}' defined twice")
        for src in st.sources:
            _check(src in seen, f"stage '{st.name}' reads '{src}' before it is computed")
        _check(isinstance(st.normaliser, (Softmax, Linear, Nested)), f"bad normaliser {st.normaliser!r}")
        verify_mask(st.mask)
        if isinstance(st.normaliser, Linear):
            _check(st.mask in (M.FULL, M.CAUSAL), f"linear stage '{st.name}' over {st.mask}")
        if isinstance(st.normaliser, Nested):
            _check(st.mask == M.CAUSAL, f"nested stage '{st.name}' must be causal")
            _check(st.normaliser.packed in dict(prog.params), f"nested stage reads non-param {st.normaliser.packed}")
        if st.heads is not None:
            _check(0 <= st.heads[0] < st.heads[1], f"bad head range {st.heads}")
        if st.score is not None:
            _check(isinstance(st.normaliser, Softmax), f"stage '{st.name}' has score terms but is not softmax")
            for t in st.score.tables():
                _check(t in {n for n, _, _ in prog.tables}, f"stage '{st.name}' reads undeclared table {t}")
        seen.add(st.name)
    _check(bool(prog.outputs), "program has no outputs")
    for out in prog.outputs:
        _check(out in {s.name for s in prog.stages}, f"output '{out}' is not a stage")
    if prog.by_heads:
        ranges = sorted(prog.stage(o).heads for o in prog.outputs)
        _check(ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])),
               f"head ranges {ranges} do not tile")
