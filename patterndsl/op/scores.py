"""Running a softmax stage with score terms: the backend's `scored` entry, given the stage's tables, its first
head (biases see absolute heads) and, for a far field, its FAVOR+ projection. A backend without `scored`
refuses the stage (the planner never picks it: `supports` says why)."""
from __future__ import annotations

from ..errors import PatternError


def far_projection(stage, head_dim: int, device, dtype):
    """The far field's projection `[m, head_dim]`, drawn from its feature map's seed (docs/language.md §5.2)."""
    from ..backends.reference.features import draw_projection
    return draw_projection(stage.score.far.favor, head_dim).to(device=device, dtype=dtype)


def run_scored(be, st, q, k, v, kpm, call, offset):
    scored = getattr(be, "scored", None)
    if scored is None:
        raise PatternError(f"the {be.name} backend has no score terms ({st.score.source()})",
                           hint="run this stage on the reference or torch backend")
    scale = st.normaliser.scale if st.normaliser.scale is not None else q.shape[-1] ** -0.5
    tables = {n: call.params[n] for n in st.score.tables()}
    w = far_projection(st, q.shape[-1], q.device, q.dtype) if st.score.far is not None else None
    return scored(st, q, k, v, scale=scale, key_padding_mask=kpm, runtime=call.runtime, q_offset=offset,
                  head_offset=st.heads[0] if st.heads else 0, tables=tables, projection=w)
