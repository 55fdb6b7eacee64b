"""Export of score terms to FlexAttention: a `score_mod(score, b, h, q_idx, kv_idx)` running each stage's one
pointwise definition (`Score.apply`) with torch ops on FlexAttention's index tensors.

FlexAttention passes `score = scale * q . k` and applies the mask after `score_mod`, the order of
docs/language.md §5.5 (bias, then soft cap, then mask). Learned tables are captured tensors (pass them as
`tables=`; gradients flow into them through `flex_attention`). A far field has no `score_mod` (it is not a
pointwise change of one score): exporting one is an error.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir.scores.ops import TorchScoreOps


def _stage_mod(st, tables: dict, q_offset: int):
    score = st.score
    if score is None:
        return lambda s, h, q_idx, kv_idx: s
    if score.far is not None:
        raise PatternError(f"stage {st.name} has a far field (far = ...), which no score_mod can express",
                           hint="export the near field's mask alone: to_flex(op) without score_mod")
    missing = [n for n in score.tables() if n not in tables]
    if missing:
        raise PatternError(f"the score_mod reads the bias table '{missing[0]}', so it needs it",
                           hint=f"pass tables={{'{missing[0]}': <tensor [H, width]>}} to to_flex")
    used = {n: tables[n] for n in score.tables()}

    def mod(s, h, q_idx, kv_idx):   # FlexAttention's h counts all heads: the absolute head already
        ops = TorchScoreOps(q_idx + q_offset, kv_idx, h, used, s.dtype)
        return score.apply(s, ops)
    return mod


def score_mod_of(stages, tables: dict | None, q_offset: int = 0):
    """`score_mod` of (head range or None, stage) pairs (`export.flex._stages`)."""
    tables = tables or {}
    for n, t in tables.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise PatternError(f"table {n} must be a tensor [H, width], got {type(t).__name__}")
    pieces = [(heads, _stage_mod(st, tables, q_offset)) for heads, st in stages]

    def score_mod(score, b, h, q_idx, kv_idx):
        out = pieces[-1][1](score, h, q_idx, kv_idx)
        for (_, stop), f in reversed(pieces[:-1]):
            out = torch.where(h < stop, f(score, h, q_idx, kv_idx), out)
        return out
    return score_mod
