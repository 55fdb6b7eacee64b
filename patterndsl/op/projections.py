"""The random-feature projections of an op's linear stages: given at compile time, or drawn from the feature
map's seed and redrawn on request (Performer's feature redrawing)."""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..inputs import shape_text
from ..ir.program import Linear, Stage


class ProjectionsMixin:
    """`AttentionOp`'s projections: `projection(stage, head_dim, device, dtype)` and `redraw()`. The op sets
    `ir`, `name`, `_projection_given`, `_projections` (drawn matrices by key) and `_draws` (redraws by stage)."""

    def _linear_stages(self) -> list[Stage]:
        return [s for s in self.ir.stages if isinstance(s.normaliser, Linear)]

    def _check_projection_given(self) -> None:
        """`projection=` is a tensor, or a dict naming random-feature stages: checked at compile time."""
        given = self._projection_given
        if given is None:
            return
        features = {s.name: s.normaliser.feature_map.features for s in self._linear_stages()
                    if hasattr(s.normaliser.feature_map, "features")}
        if not features:
            raise PatternError(f"projection= was given, but pattern {self.name} has no random-feature stage")
        items = given.items() if isinstance(given, dict) else [(name, given) for name in features]
        for name, w in items:
            if name not in features:
                from ..errors import did_you_mean
                raise PatternError(f"projection for '{name}': no random-feature stage of that name in {self.name}",
                                   hint=did_you_mean(str(name), features) or f"stages: {', '.join(features)}")
            ok = isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2 and w.shape[0] == features[name]
            if not ok:
                raise PatternError(f"projection for stage {name} must be a float tensor [{features[name]}, head_dim] "
                                   f"(features, head_dim), got {shape_text(w)}")

    def projection(self, stage: Stage, head_dim: int, device, dtype) -> torch.Tensor | None:
        """The random-feature matrix `[m, head_dim]` of a linear stage (None for elu1): user-given or drawn
        from the feature map's seed (and the redraw count)."""
        from ..backends.reference.features import draw_projection
        fm = stage.normaliser.feature_map
        if not hasattr(fm, "features"):
            return None
        given = self._projection_given
        if isinstance(given, dict):
            given = given.get(stage.name)
        if given is not None:
            if not isinstance(given, torch.Tensor) or tuple(given.shape) != (fm.features, head_dim):
                raise PatternError(f"projection for stage {stage.name} must be a tensor [{fm.features}, {head_dim}] "
                                   f"(features, head_dim), got {shape_text(given)}")
            return given.to(device=device, dtype=dtype)
        key = (stage.name, head_dim, str(device), dtype, self._draws.get(stage.name, 0))
        if key not in self._projections:
            w = draw_projection(fm, head_dim, draw=self._draws.get(stage.name, 0))
            self._projections = {k_: v_ for k_, v_ in self._projections.items() if k_[0] != stage.name}
            self._projections[key] = w.to(device=device, dtype=dtype)
        return self._projections[key]

    def redraw(self) -> None:
        """Draw fresh random features for every linear stage (Performer's feature redrawing)."""
        for st in self._linear_stages():
            self._draws[st.name] = self._draws.get(st.name, 0) + 1
