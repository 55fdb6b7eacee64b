"""The mask algebra's import surface: which (query i, key j) pairs interact, as immutable values in a normal form.

Primitives lower to a few canonical nodes, each defined with everything it means in one module of
`ir/masks/`: `Band(lo, hi, step)` covers sliding, window, causal and strided (`lo <= i - j <= hi` and
`(i - j) % step == 0`, None = unbounded); `Rows`/`Cols` cover global, rows and cols; `Blocks`, `Random`, `Same`
and `Where` stand alone. The smart constructors `union`, `inter` and `complement` flatten, sort, deduplicate
and fold constants, intersect bands in closed form and merge index sets, so equal patterns written
differently get equal, hashable values (used as cache keys).

>>> sliding(2) | CAUSAL == union(CAUSAL, sliding(2))
True
>>> inter(CAUSAL, sliding(256))
Band(lo=0, hi=256, step=1)
>>> global_({0}) == union(Rows(frozenset({0})), Cols(frozenset({0})))
True
"""
from __future__ import annotations

from typing import Union as _U

from .masks import (BUILDERS, CAUSAL, EMPTY, FULL, KEEP_ALL, Band, Blocks, Cols, Empty, Full, Inter, Keep,  # noqa: F401
                    Mask, Not, Random, Rows, Same, Union, Where, band_mask as band, blocks_mask as blocks, cols,
                    complement, difference, global_, inter, random_blocks, rows, runtime_inputs, sliding, strided,
                    union, walk, window)

MaskT = _U[Full, Empty, Band, Rows, Cols, Blocks, Random, Same, Where, Union, Inter, Not]


def children(m: Mask) -> tuple:
    return m.children


def is_causal(m: Mask) -> bool:
    return m == CAUSAL


def to_source(m: Mask) -> str:
    """The mask as `.attn` text (an equivalent spelling of the normal form)."""
    if not isinstance(m, Mask):
        raise TypeError(f"not a mask: {m!r}")
    return m.source()
