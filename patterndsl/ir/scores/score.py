"""A stage's score terms: what happens to `s = scale * q . k` before the mask and the normalisation.

Order (docs/language.md §5.5): `s = scale * q_i . k_j`, then `s + bias(i, j, h)`, then `cap * tanh(s / cap)`,
then the mask and the softmax. `far` (FAVOR+ estimates of the keys outside the mask, in the same softmax)
excludes the others (an estimate of `exp(s)` cannot carry a bias or a cap).
"""
from __future__ import annotations

from dataclasses import dataclass

from .expr import Term
from .far import Far
from .softcap import softcap as _softcap


@dataclass(frozen=True)
class Score:
    bias: Term | None = None
    softcap: float | None = None
    far: Far | None = None

    def apply(self, s, ops):
        """The score after the terms: `s` the scaled dot products, `ops` evaluates the bias."""
        if self.bias is not None:
            s = ops.add_bias(s, self.bias.at(ops))
        if self.softcap is not None:
            s = _softcap(s, self.softcap, ops)
        return s

    @property
    def pointwise(self) -> bool:
        """Terms that change one score at a time (bias, soft cap), not the far field."""
        return self.far is None

    def pair_flops(self) -> int:
        """Operations per scored pair the pointwise terms add (a tanh counted as 8)."""
        bias = 1 + self.bias.flops() if self.bias is not None else 0
        return bias + (10 if self.softcap is not None else 0)

    def tables(self) -> tuple[str, ...]:
        return self.bias.tables() if self.bias is not None else ()

    def source(self) -> str:
        """The terms as `.attn` options (`, bias = ..., softcap = ..., far = ...`)."""
        out = []
        if self.bias is not None:
            out.append(f"bias = {self.bias.source()}")
        if self.softcap is not None:
            out.append(f"softcap = {self.softcap!r}")
        if self.far is not None:
            out.append(f"far = {self.far.source()}")
        return ", ".join(out)

    def describe(self) -> str:
        return "[" + self.source() + "]"
