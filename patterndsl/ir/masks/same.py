"""Runtime ids: `same(name)` allows `ids[i] == ids[j]` for an id tensor passed to the op at call time.

Document masking and packed sequences: ids `[B, N]` (or a pair `(query ids [B, N_q], key ids [B, N_k])`, row r
of the call's queries first). Without ids every tile is partial; with them a tile is empty when the query
and key id ranges are disjoint in every batch row, full when one id covers both in every batch row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PARTIAL, Mask, classes, sure


@dataclass(frozen=True, repr=True)
class Same(Mask):
    """`ids[i] == ids[j]` for a runtime tensor `ids` passed to the op under this name."""
    name: str

    def source(self) -> str:
        return f"same({self.name})"

    def runtime_names(self) -> tuple[str, ...]:
        return (self.name,)

    def at(self, i, j, ops):
        return ops.cmp("==", ops.ids(self.name, "q", i), ops.ids(self.name, "k", j))

    def classify(self, tiles, a, b):
        runtime = tiles.runtime or {}
        if self.name not in runtime:
            return sure(PARTIAL)
        ids = runtime[self.name]
        q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
        g = tiles.grid
        qmin, qmax = _tile_range(q_ids.cpu(), g.bm, g.nqb)                  # [B, nqb]
        kmin, kmax = _tile_range(k_ids.cpu(), g.bn, g.nkb)
        qmin, qmax, kmin, kmax = qmin[:, a], qmax[:, a], kmin[:, b], kmax[:, b]
        empty = ((qmax < kmin) | (kmax < qmin)).all(0)
        full = ((qmin == qmax) & (kmin == kmax) & (qmin == kmin)).all(0)
        cls = classes(full, empty)
        return cls, cls == PARTIAL


def _tile_range(ids: torch.Tensor, block: int, nb: int):
    pad = nb * block - ids.shape[1]
    if pad:
        ids = torch.cat([ids, ids[:, -1:].expand(-1, pad)], 1)   # repeat the last id: ranges unchanged
    t = ids.view(ids.shape[0], nb, block)
    return t.amin(-1), t.amax(-1)
