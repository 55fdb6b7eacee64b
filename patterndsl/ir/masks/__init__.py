"""The mask algebra, one module per family of primitives (see `base.py` for what each node defines).

`logic` (full, empty, |, &, ~ and the normal form), `band` (causal, sliding, window, strided), `index` (rows,
cols, global), `blocks`, `random`, `same` (runtime ids) and `where` (predicates). A new primitive is one more
module here (found by `FAMILIES`): its node class, its constructor and its `BUILDERS` entry for the language,
whose spelling (name and arguments) is one entry of the front end's table, `grammar/signatures.py`.
"""
from __future__ import annotations

import importlib
import pkgutil

from .band import CAUSAL, Band, band_bounds, sliding, strided, window
from .band import band as band_mask
from .base import EMPTY as EMPTY_TILE
from .base import FULL as FULL_TILE
from .base import KEEP_ALL, PARTIAL, Builder, Keep, Mask, Tiles, classes
from .blocks import Blocks, blocks as blocks_mask
from .index import Cols, Rows, cols, global_, rows
from .logic import EMPTY, FULL, Empty, Full, Inter, Not, Union, complement, difference, inter, runtime_inputs, union, walk
from .random import Random, random_, random_blocks
from .same import Same
from .where import Where

FAMILIES = tuple(importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
                 if m.name != "base")
BUILDERS: dict[str, Builder] = {name: b for fam in FAMILIES for name, b in getattr(fam, "BUILDERS", {}).items()}


def evaluate(mask: Mask, i, j, ops):
    """Whether each (i, j) is allowed, built with `ops` (i: absolute query positions, j: key positions)."""
    return mask.at(i, j, ops)


__all__ = ["BUILDERS", "CAUSAL", "EMPTY", "EMPTY_TILE", "FULL", "FULL_TILE", "KEEP_ALL", "Keep", "PARTIAL", "Band",
           "Blocks", "Builder",
           "Cols", "Empty", "Full", "Inter", "Mask", "Not", "Random", "Rows", "Same", "Tiles", "Union", "Where",
           "band_bounds", "band_mask", "blocks_mask", "classes", "cols", "complement", "difference", "evaluate",
           "global_", "inter", "random_", "random_blocks", "rows", "runtime_inputs", "sliding", "strided", "union",
           "walk", "window"]
