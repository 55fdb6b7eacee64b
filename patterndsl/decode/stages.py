"""What one stage keeps between decode steps, and its step: a key buffer (softmax), the running sums and max of
the causal scan (linear attention), or causal Luna's cumulative sums.

Each `step(op, q, k, v, valid, ids, c, p, t)` takes the stage's new tokens at positions t .. t + n - 1 (its
query heads, its kv heads) and returns their rows, equal to the stage run by `op(..., q_offset=t)` over every
key so far.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import Linear, Softmax, Stage
from .softmax import KeyBuffer, allowed_at, attend_at

PREFILL_ROWS = 16     # a step of more rows over keys 0 .. N-1 runs on the op's backend (block-sparse etc.)
_LOW = (torch.float16, torch.bfloat16)


def _work(x):
    return x.float() if x is not None and x.dtype in _LOW else x


class SoftmaxState:
    """A softmax stage: its retained keys (`KeyBuffer`, the mask's `retained` rule). Pointwise score terms (bias,
    learned tables, soft cap; docs/language.md §5.5) are applied at the queries' and the held keys' positions, on
    the stage's absolute heads; `p` holds the stage's bias tables then."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.buffer = KeyBuffer(stage.mask, M.runtime_inputs(stage.mask))

    def held(self) -> int:
        return self.buffer.count

    def step(self, op, be, q, k, v, valid, ids, c, p, t):
        buf, n = self.buffer, q.shape[2]
        buf.append(k, v, valid, ids, t)
        K, V, pos, ok, key_ids = buf.view()
        norm = self.stage.normaliser
        scale = norm.scale if norm.scale is not None else q.shape[-1] ** -0.5
        score = self.stage.score
        head0 = self.stage.heads[0] if self.stage.heads else 0
        if buf.contiguous and n > PREFILL_ROWS and (score is None or hasattr(be, "scored")):   # the op's kernels
            runtime = {name: (ids[name], key_ids[name]) for name in buf.names}
            kpm = None if bool(ok.all()) else ~ok
            if score is None:
                out = be.softmax(self.stage, q, K, V, scale=scale, key_padding_mask=kpm, runtime=runtime, q_offset=t)
            else:
                out = be.scored(self.stage, q, K, V, scale=scale, key_padding_mask=kpm, runtime=runtime, q_offset=t,
                                head_offset=head0, tables=p or {})
        else:
            allowed = allowed_at(self.stage.mask, n, t, pos, t + n, ids, key_ids) & ok[:, None, :]
            terms = None if score is None else score_terms(score, t, pos, head0, q.shape[1], p or {})
            out = attend_at(q, K, V, allowed, scale, buf.finite, terms)
        buf.evict(t + n)
        return out


def score_terms(score, t: int, pos, head0: int, heads: int, tables: dict):
    """`terms(r, s)` for `attend_at`: the score terms on rows `t + r ..` against the held keys at `pos`."""
    from ..ir.scores.ops import TorchScoreOps

    def apply(r, s):                                   # s [B, H_kv, G, n, K]
        Hk, G, n = s.shape[1], s.shape[2], s.shape[3]
        i = (t + r + torch.arange(n, device=s.device))[:, None]
        h = (head0 + torch.arange(heads, device=s.device)).reshape(Hk, G, 1, 1)
        ops = TorchScoreOps(i, pos[None, :], h, {k: x.to(s.dtype) for k, x in tables.items()}, s.dtype)
        return score.apply(s, ops)
    return apply


class LinearState:
    """A linear stage: the scan's sums and running max per kv head (causal), or the same sums read by every
    row (full: each row sees every key so far)."""

    def __init__(self, stage: Stage):
        self.stage, self.state, self.draw = stage, None, None

    def held(self) -> int:
        return 0

    def step(self, op, be, q, k, v, valid, ids, c, p, t):
        from ..backends.torch import CAUSAL_CHUNK
        from ..backends.torch.linear_scan import absorb, causal_scan, grouped, read
        st, fm = self.stage, self.stage.normaliser.feature_map
        draw = op._draws.get(st.name, 0)
        if self.draw is not None and draw != self.draw:
            raise PatternError(f"stage {st.name} drew new random features (op.redraw()) since this cache was "
                               f"filled", hint="start a new cache with op.cache() after redrawing")
        self.draw = draw
        dtype = q.dtype
        q, k, v = _work(q), _work(k), _work(v)
        w = op.projection(st, q.shape[-1], q.device, q.dtype)
        keep = valid[:, None, :, None]
        kg, vg = torch.where(keep, k, 0.0)[:, :, None], torch.where(keep, v, 0.0)[:, :, None]
        qg = grouped(q, k)
        if st.causal:
            out, self.state = causal_scan(qg, kg, vg, valid, fm, w, CAUSAL_CHUNK, self.state)
        else:
            self.state = absorb(self.state, kg, vg, valid, fm, w)
            out = read(self.state, qg, fm, w)
        return out.reshape(*q.shape[:3], v.shape[-1]).to(dtype)


class LunaState:
    """A causal Luna stage: its cumulative sums per query head (`a[j, l]` depends on the head's packed queries)."""

    def __init__(self, stage: Stage):
        self.stage, self.state = stage, None

    def held(self) -> int:
        return 0

    def step(self, op, be, q, k, v, valid, ids, c, p, t):
        from ..backends.torch.nested_scan import luna_scan
        dtype = q.dtype
        q, k, v, c, p = (_work(x) for x in (q, k, v, c, p))
        B, H, n, _ = q.shape
        Hk = k.shape[1]
        qg, pg = q.reshape(B, Hk, H // Hk, n, -1), p.reshape(B, Hk, H // Hk, *p.shape[2:])
        out, self.state = luna_scan(qg, k[:, :, None], v[:, :, None], pg, c[:, :, None], valid, self.state)
        return out.reshape(B, H, n, v.shape[-1]).to(dtype)


def stage_state(stage: Stage):
    """The state a stage keeps while decoding (the stage reads queries and keys from the token stream)."""
    norm = stage.normaliser
    if getattr(stage, "score", None) is not None and stage.score.far is not None:
        raise PatternError(f"stage {stage.name} has a far field ({stage.score.source()}), which decoding does not "
                           "keep yet", hint="call the op on the new tokens with q_offset= over every key so far")
    if isinstance(norm, Softmax):
        return SoftmaxState(stage)
    if isinstance(norm, Linear):
        return LinearState(stage)
    return LunaState(stage)
