"""Predicates: `where(p)` allows the pairs where a predicate over `i` and `j` holds (`ir/predicate.py`).

Pointwise, the predicate is evaluated with the caller's ops (so it becomes a torch tensor, a Flex body or
Triton text like every other node); on tiles, interval arithmetic (`ir/interval.py`) says whether it surely
holds, surely fails or may do either, and "either" tiles are left for the planner to settle.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..interval import tile_truth
from ..predicate import WHERE_LIMIT, Pred, evaluate, peak_magnitude
from .base import PARTIAL, Mask, classes


@dataclass(frozen=True, repr=True)
class Where(Mask):
    """Any predicate over i and j."""
    pred: Pred

    def source(self) -> str:
        return f"where({self.pred})"

    def label(self) -> str:
        text = str(self.pred)
        return f"where({text if len(text) <= 32 else text[:29] + '...'})"

    def problems(self):
        peak = peak_magnitude(self.pred)
        if peak >= WHERE_LIMIT:
            yield (f"where({self.pred}) can reach magnitude 2^{peak.bit_length() - 1} or more for positions "
                   f"below 2^31, beyond the 64-bit arithmetic every backend evaluates it in")

    def at(self, i, j, ops):
        return evaluate(self.pred, i, j, ops)

    def classify(self, tiles, a, b):
        (r0, r1), (c0, c1) = tiles.grid.row_bounds(a), tiles.grid.col_bounds(b)
        t = tile_truth(self.pred, r0, r1, c0, c1)
        cls = classes(~t.can_false, ~t.can_true)
        return cls, cls == PARTIAL
