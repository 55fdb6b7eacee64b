"""Choosing a lowering per stage: every declared lowering that applies, its predicted time, the cheapest.

`choose(problem, requested)` lists the candidates (every declared lowering of the stage's kind, restricted to
one backend when the user named one), asks each whether it applies and what work it does, predicts its time
with the device's calibrated constants and picks the lowest score. The reference is a last resort: `auto`
takes it only when nothing else applies. `pin(name)` forces a lowering (tests reach rarely chosen ones).

>>> import torch, patterndsl as pd
>>> from patterndsl.plan.lowering import Problem
>>> op = pd.compile("sliding_window", window=64)
>>> choice = choose(Problem(op.ir.stages[0], 1, 4, 4096, 4096, 64, 64), "torch")
>>> choice.chosen.backend
'torch'
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import PatternError
from ..ir.program import ProgramIR
from .calibrate import constants as device_constants
from .lowering import Lowering, Problem, Work, declared, lowering, stage_kind
from .model import Constants, Prediction, fmt_seconds, predict

_PINNED: list[tuple[str, ...]] = [()]          # a plain list, not a contextvar: torch.compile traces reads
PREFERENCE = {"cuda": ("triton", "torch", "reference"), "cpu": ("torch", "triton", "reference")}
TIE = 1.10     # predictions this close are within the model's error: take the one with fewer kernel calls


@dataclass(frozen=True)
class Candidate:
    lowering: Lowering
    why_not: str | None              # None: it applies
    work: Work | None = None
    prediction: Prediction | None = None


@dataclass(frozen=True)
class Choice:
    problem: Problem
    chosen: Lowering
    why: str
    candidates: tuple[Candidate, ...]
    constants: Constants

    @property
    def prediction(self) -> Prediction:
        return next(c.prediction for c in self.candidates if c.lowering is self.chosen)


@contextlib.contextmanager
def pin(*names: str):
    """Inside the block, stages run with these lowerings (one per kind), whatever the costs say."""
    for n in names:
        lowering(n)                                   # KeyError for an unknown name
    _PINNED.append(tuple(names))
    try:
        yield
    finally:
        _PINNED.pop()


def pinned() -> tuple[str, ...]:
    return _PINNED[-1]


def candidates(problem: Problem, requested: str = "auto", consts: Constants | None = None,
               any_length: bool = False) -> list[Candidate]:
    """Every declared lowering of the problem's kind (of the requested backend), applied and predicted;
    `any_length` keeps those that run at lengths torch.compile leaves symbolic."""
    consts = consts or device_constants(problem.device)
    out = []
    for lw in declared(problem.kind, None if requested == "auto" else requested):
        if any_length and not lw.any_length:
            out.append(Candidate(lw, "needs concrete lengths (torch.compile keeps them symbolic)"))
            continue
        try:
            why = lw.applies(problem)
            if why is None and requested == "auto" and lw.explicit is not None:
                why = lw.explicit(problem)
        except ImportError as e:                     # an optional dependency is missing
            why = f"cannot import: {e}"
        if why is not None:
            out.append(Candidate(lw, why))
            continue
        work = lw.work(problem)
        paid = lw.ready(problem) if lw.ready is not None else True
        fit = consts.fit(lw.name, problem.grad)
        out.append(Candidate(lw, None, work, predict(work, consts, problem.dtype, paid=paid, fit=fit)))
    return out


def choose(problem: Problem, requested: str = "auto", consts: Constants | None = None,
           any_length: bool = False) -> Choice:
    """The lowering to run `problem` with, why, and every candidate considered."""
    consts = consts or device_constants(problem.device)
    cands = candidates(problem, requested, consts, any_length)
    viable = [c for c in cands if c.why_not is None]
    forced = [c for c in viable if c.lowering.name in pinned()]
    if forced:
        return Choice(problem, forced[0].lowering, "pinned", tuple(cands), consts)
    if pinned() and any(problem.kind in lowering(n).kinds for n in pinned()):
        name = next(n for n in pinned() if problem.kind in lowering(n).kinds)
        why = next((c.why_not for c in cands if c.lowering.name == name), "not a candidate here")
        raise PatternError(f"pinned lowering {name} cannot run stage {problem.stage.name}: {why}")
    normal = [c for c in viable if not c.lowering.last_resort] or viable
    if not normal:
        where = f"on {problem.device}" + ("" if requested == "auto" else f" with backend '{requested}'")
        raise PatternError(f"no lowering can run stage {problem.stage.name} {where}",
                           hint="; ".join(f"{c.lowering.name}: {c.why_not}" for c in cands) or "none declared")
    ranked = sorted(normal, key=lambda c: c.prediction.score)
    ties = [c for c in ranked if c.prediction.score <= TIE * ranked[0].prediction.score]
    best = min(ties, key=lambda c: (c.work.term("call"), c.prediction.score))
    ranked.remove(best)
    ranked.insert(0, best)
    return Choice(problem, best.lowering, _why(best, ranked, viable, requested), tuple(cands), consts)


def _why(best: Candidate, ranked: list, viable: list, requested: str) -> str:
    pick = "requested backend" if requested != "auto" else "auto"
    own = f"predicted {fmt_seconds(best.prediction.seconds)}"
    if best.prediction.once:
        own += f" (+{fmt_seconds(best.prediction.once)} once)"
    if best.lowering.last_resort:
        return f"{pick}: the only lowering that applies ({own})"
    if len(ranked) == 1:
        return f"{pick}: {own}, the only one that applies" + (" besides the reference" if len(viable) > 1 else "")
    nxt = ranked[1]
    ratio = nxt.prediction.score / max(best.prediction.score, 1e-12)
    if ratio < 1:
        return (f"{pick}: {own}, within {TIE:.2f}x of {nxt.lowering.name} ({fmt_seconds(nxt.prediction.seconds)}): "
                f"the model's error, so the one with fewer kernel calls")
    return f"{pick}: {own}, {ratio:.2f}x below the next ({nxt.lowering.name})"


# ------------------------------------------------------------------------------------ backends per stage
def select_backends(ir: ProgramIR, requested: str, device: torch.device) -> dict[str, str]:
    """Map each stage to the backend whose lowerings run it on `device` (the preferred backend with one that
    applies at a nominal shape; no timing). A named backend that cannot run a stage is an error."""
    device = torch.device(device)
    order = PREFERENCE.get(device.type, PREFERENCE["cpu"]) if requested == "auto" else (requested,)
    choice = {}
    for st in ir.stages:
        nominal = Problem(st, 1, 1, 1024, 1024, 64, 64, torch.float32, device)
        reasons = []
        for name in order:
            why = [_applies(lw, nominal) for lw in declared(stage_kind(st), name)]
            if any(w is None for w in why):
                choice[st.name] = name
                break
            reasons.append(f"{name}: {'; '.join(w for w in why if w) or 'no lowering declared'}")
        else:
            raise PatternError(f"no backend can run stage {st.name} of {ir.name} on {device}",
                               hint="; ".join(reasons))
    return choice


def _applies(lw: Lowering, problem: Problem) -> str | None:
    try:
        return lw.applies(problem)
    except ImportError as e:
        return f"cannot import: {e}"
