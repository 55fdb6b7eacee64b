"""Comparing two patterns: equal, A within B, B within A, or neither, with the pairs that tell them apart.

Two masks compare by the two inclusions (`contain.py`). Two programs compare when they have the same shape:
the same normalisers, sources and outputs stage by stage (stages matched in schedule order), and for
per-head programs the same head count (a single-stage program stands for every head). Their masks then
compare part by part: stage by stage, or head range by head range where either program changes stage.
A program is *within* another when every part's mask is; *equal* when every part is equal.

>>> print(compare("sliding(1) | sliding(2)", "sliding(2)"))
A: sliding(1) | sliding(2)
B: sliding(2)
equal, proved for every N
>>> print(compare("window(3, 0)", "causal"))
A: window(3, 0)
B: causal
A within B, proved for every N
  in B, not in A: i=4, j=0 (N = 5)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import INPUT, Nested, ProgramIR, Stage
from .contain import DEFAULT_BOUND, Inclusion, check_bound, inclusion
from .subjects import describe, subject

VERDICTS = ("equal", "A within B", "B within A", "neither")


@dataclass(frozen=True)
class Part:
    """One compared part: a label (`mask`, `stage out`, `heads[0:4]`), the two masks and both inclusions."""
    label: str
    a: M.Mask
    b: M.Mask
    a_in_b: Inclusion
    b_in_a: Inclusion

    @property
    def verdict(self) -> str:
        return VERDICTS[(not self.a_in_b.holds) * 2 + (not self.b_in_a.holds)] if (
            self.a_in_b.holds or self.b_in_a.holds) else "neither"


@dataclass(frozen=True)
class Comparison:
    """The result of `compare`: `verdict` is one of VERDICTS; `proved` says it holds for every N (else
    `checked` names the sizes checked); `a_not_b` / `b_not_a` are pairs telling the two apart."""
    a: str
    b: str
    parts: tuple[Part, ...]

    def _all(self, attr: str):
        return [getattr(p, attr) for p in self.parts]

    @property
    def verdict(self) -> str:
        a_in_b = all(p.a_in_b.holds for p in self.parts)
        b_in_a = all(p.b_in_a.holds for p in self.parts)
        return "equal" if a_in_b and b_in_a else "A within B" if a_in_b else "B within A" if b_in_a else "neither"

    @property
    def proved(self) -> bool:
        return all(x.proved for p in self.parts for x in (p.a_in_b, p.b_in_a))

    @property
    def checked(self) -> str:
        unproved = [x for p in self.parts for x in (p.a_in_b, p.b_in_a) if not x.proved]
        return "every N" if not unproved else unproved[0].checked

    def _witness(self, attr: str):
        for p in self.parts:
            inc: Inclusion = getattr(p, attr)
            if not inc.holds:
                return p.label, inc.missing
        return None

    @property
    def a_not_b(self):
        """(part label, Pair) of a pair in A and not in B, or None."""
        return self._witness("a_in_b")

    @property
    def b_not_a(self):
        return self._witness("b_in_a")

    def __str__(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}"]
        how = "proved for every N" if self.proved else f"checked for {self.checked}"
        lines.append(f"{self.verdict}, {how}")
        multi = len(self.parts) > 1
        for tag, w in (("in A, not in B", self.a_not_b), ("in B, not in A", self.b_not_a)):
            if w is not None:
                lines.append(f"  {tag}: {w[1]}" + (f" ({w[0]})" if multi else ""))
        if multi:
            lines += [f"  {p.label}: {p.verdict}  [{M.to_source(p.a)}  vs  {M.to_source(p.b)}]" for p in self.parts]
        reasons = dict.fromkeys(x.reason for p in self.parts for x in (p.a_in_b, p.b_in_a)
                                if not x.proved and x.reason)
        lines += [f"  (no proof for every N: {r})" for r in reasons]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- alignment
def _mismatch(a, b, what: str) -> PatternError:
    return PatternError(f"cannot compare {describe(a)} and {describe(b)}: {what}",
                        hint="programs compare stage by stage when their stages, normalisers and sources "
                             "match; compare two stages' masks directly with pd.compare(mask_a, mask_b)")


def _only_mask(x, other) -> M.Mask:
    if isinstance(x, M.Mask):
        return x
    if len(x.stages) != 1 or x.stages[0].query != INPUT or x.stages[0].keys != INPUT:
        raise _mismatch(x, other, f"{x.name} has {len(x.stages)} stages, the other side is one mask")
    return x.stages[0].mask


def _role(ir: ProgramIR, src: str):
    if src == INPUT:
        return "input"
    params = dict(ir.params)
    if src in params:
        return ("param", params[src])
    return ("stage", [s.name for s in ir.stages].index(src))


def _shape(st: Stage, ir: ProgramIR):
    n = st.normaliser
    norm = ("nested", _role(ir, n.packed)) if isinstance(n, Nested) else n
    return norm, _role(ir, st.query), _role(ir, st.keys)


def _source(role, name: str) -> str:
    if role == "input":
        return "the input"
    return f"param {name}[{role[1]}]" if role[0] == "param" else f"stage {name}"


def _what(st: Stage) -> str:
    """A stage without its mask, name or heads: `attend softmax query input keys input`."""
    text = st.describe().split(" = ", 1)[1].split(" over ")[0]
    return text.replace(" query input keys input", "")


def _label(st: Stage, k: int) -> str:
    return f"stage {k + 1}" if st.name.startswith("_") else f"stage {st.name}"


def _stage_parts(a: ProgramIR, b: ProgramIR):
    if len(a.stages) != len(b.stages):
        raise _mismatch(a, b, f"{len(a.stages)} stage(s) against {len(b.stages)}")
    for k, (sa, sb) in enumerate(zip(a.stages, b.stages)):
        (na, qa, ka), (nb, qb, kb) = _shape(sa, a), _shape(sb, b)
        if na != nb:
            raise _mismatch(a, b, f"{_label(sa, k)} is `{_what(sa)}` in {a.name}, `{_what(sb)}` in {b.name}")
        for role, x, y, src_a, src_b in (("queries", qa, qb, sa.query, sb.query), ("keys", ka, kb, sa.keys, sb.keys)):
            if x != y:
                raise _mismatch(a, b, f"{_label(sa, k)} reads {role} from {_source(x, src_a)} in {a.name}, "
                                      f"from {_source(y, src_b)} in {b.name}")
    if [_role(a, o) for o in a.outputs] != [_role(b, o) for o in b.outputs]:
        raise _mismatch(a, b, "they return different stages")
    return [(_label(sa, k), sa.mask, sb.mask) for k, (sa, sb) in enumerate(zip(a.stages, b.stages))]


def _head_stages(ir: ProgramIR, heads: int | None, other):
    """(start, stop, stage) covering heads 0..heads-1."""
    if ir.by_heads:
        for o in ir.outputs:
            st = ir.stage(o)
            if st.query != INPUT or st.keys != INPUT:
                raise _mismatch(ir, other, f"per-head stage {st.name} reads another stage")
        return [(*ir.stage(o).heads, ir.stage(o)) for o in ir.outputs]
    if len(ir.stages) != 1:
        raise _mismatch(ir, other, f"{ir.name} has {len(ir.stages)} stages and no per-head split")
    return [(0, heads, ir.stages[0])]


def _head_parts(a: ProgramIR, b: ProgramIR):
    if a.by_heads and b.by_heads and a.num_heads != b.num_heads:
        raise _mismatch(a, b, f"{a.num_heads} heads against {b.num_heads}")
    heads = a.num_heads or b.num_heads
    ha, hb = _head_stages(a, heads, b), _head_stages(b, heads, a)
    cuts = sorted({h for x in ha + hb for h in x[:2]})
    parts = []
    for h0, h1 in zip(cuts, cuts[1:]):
        sa = next(s for s0, s1, s in ha if s0 <= h0 < s1)
        sb = next(s for s0, s1, s in hb if s0 <= h0 < s1)
        if _shape(sa, a)[0] != _shape(sb, b)[0]:
            raise _mismatch(a, b, f"heads[{h0}:{h1}] are `{_what(sa)}` in {a.name}, `{_what(sb)}` in {b.name}")
        parts.append((f"heads[{h0}:{h1}]", sa.mask, sb.mask))
    return parts


def _parts(a, b):
    if isinstance(a, M.Mask) or isinstance(b, M.Mask):
        return [("mask", _only_mask(a, b), _only_mask(b, a))]
    if a.by_heads or b.by_heads:
        return _head_parts(a, b)
    return _stage_parts(a, b)


# ------------------------------------------------------------------------------------------------- public
def compare(a, b, bound: int = DEFAULT_BOUND, params_a: dict | None = None,
            params_b: dict | None = None) -> Comparison:
    """Compare two patterns: masks, mask expressions (`"sliding(2) | causal"`), programs (anything
    `pd.compile` takes), ops or IR. Decided for every N where the closed forms allow, otherwise checked on
    tile layouts for every N up to `bound`; see `Comparison`."""
    check_bound(bound)
    sa, sb = subject(a, params_a), subject(b, params_b)
    parts = []
    for label, ma, mb in _parts(sa, sb):
        parts.append(Part(label, ma, mb, inclusion(ma, mb, bound), inclusion(mb, ma, bound)))
    return Comparison(_name(a, sa), _name(b, sb), tuple(parts))


def _name(given, resolved) -> str:
    """The user's own spelling of a mask expression, else the program's name or the mask's source."""
    return given.strip() if isinstance(given, str) and isinstance(resolved, M.Mask) else describe(resolved)
