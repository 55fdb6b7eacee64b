"""Decoding: an op run token by token over a cache that keeps only what later tokens can use (docs/decoding.md).

>>> import torch, patterndsl as pd
>>> op = pd.compile("sliding_window", window=4, backend="reference")
>>> q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
>>> cache = op.cache()
>>> first = op.decode(q[:, :, :6], k[:, :, :6], v[:, :, :6], cache)          # prefill positions 0 .. 5
>>> rest = [op.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache) for t in range(6, 9)]
>>> full = op(q, k, v)
>>> torch.allclose(torch.cat([first] + rest, 2), full, atol=1e-5), cache.length
(True, 9)

A `DecodeCache` holds, per stage, a `KeyBuffer` (softmax: the keys the mask's `retained` rule says later
queries may see, e.g. a window's last keys and the global ones), a `ScanState` (causal linear attention: the
sums and running max of the scan) or a `LunaState` (causal Luna's cumulative sums). `op.decode(q, k, v, cache)`
appends the new tokens and returns their rows; it equals `op(q, K, V, q_offset=cache.length)` over every key
so far, so for a causal pattern prefill then decode equals the full forward. Decoding is inference: it runs
without gradients.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..inputs import shape_text
from ..ir import mask as M
from ..ir.program import INPUT, Nested, Softmax
from ..op.graph import stage_kv
from ..op.validate import check_call, check_offset
from .softmax import KeyBuffer, allowed_at, attend_at
from .stages import score_terms, stage_state

__all__ = ["DecodeCache", "KeyBuffer", "allowed_at", "attend_at", "attend_window", "decode_step"]


class DecodeCache:
    """What `op.decode` keeps between steps for one op: `length` (tokens seen so far) and one state per stage.
    `held()` gives the keys each softmax stage holds now."""

    def __init__(self, op):
        for st in op.ir.stages:
            if st.query != INPUT or st.keys != INPUT:
                src = st.query if st.query != INPUT else st.keys
                raise PatternError(f"op.decode runs programs whose stages attend from the tokens to the tokens; "
                                   f"stage {st.name} of {op.name} reads {'queries' if st.query != INPUT else 'keys'} "
                                   f"from {src}", hint="run the whole sequence with op(q, k, v) instead")
        self.op = op
        self.length = 0
        self.shape = None            # (B, H, H_kv, D, D_v, dtype, device) of the first step
        self.states = {st.name: stage_state(st) for st in op.ir.stages}

    def held(self) -> dict[str, int]:
        """Keys held per stage (0 for stages that keep sums instead)."""
        return {name: s.held() for name, s in self.states.items()}

    def _bind(self, q, k, v) -> None:
        shape = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3], q.dtype, q.device)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            names = ("batch", "heads", "kv heads", "head dim", "value head dim", "dtype", "device")
            diff = next(i for i in range(len(shape)) if shape[i] != self.shape[i])
            raise PatternError(f"this cache was filled with {names[diff]} {self.shape[diff]}, got {shape[diff]}: "
                               f"q {shape_text(q)}, k {shape_text(k)}, v {shape_text(v)}",
                               hint="start a new cache with op.cache() for another shape")

    def __repr__(self) -> str:
        return f"<DecodeCache of {self.op.name}: {self.length} tokens, keys held {self.held()}>"


def decode_step(op, q, k, v, cache, key_padding_mask=None, inputs=None):
    """`op.decode`: the rows of the new tokens (see the module docstring)."""
    if not isinstance(cache, DecodeCache) or cache.op is not op:
        got = "a cache of another op" if isinstance(cache, DecodeCache) else type(cache).__name__
        raise PatternError(f"op.decode needs a cache from this op's op.cache(), got {got}")
    call = check_call(op.ir, q, k, v, key_padding_mask, 0, dict(inputs or {}))
    n, t = q.shape[2], cache.length
    if k.shape[2] != n:
        raise PatternError(f"op.decode takes the new tokens' queries, keys and values: q {shape_text(q)} has {n}, "
                           f"k {shape_text(k)} has {k.shape[2]}",
                           hint="pass k, v [B, H_kv, n, D] of the same n tokens as q; the cache holds the rest")
    check_offset(t, q.shape[0], n, t + n)
    cache._bind(q, k, v)
    valid = (~key_padding_mask if key_padding_mask is not None
             else torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device))
    backends = op._stage_backends(q.device)
    values = {}
    with torch.no_grad():
        for st in op.ir.stages:
            values[st.name] = _stage_step(op, backends[st.name], st, call, cache, valid, t)
    cache.length = t + n
    return _outputs(op, values)


def _outputs(op, values: dict):
    if op.ir.by_heads:
        return torch.cat([values[o] for o in op.ir.outputs], dim=1)
    outs = tuple(values[o] for o in op.ir.outputs)
    return outs[0] if len(outs) == 1 else outs


def _stage_step(op, be, st, call, cache, valid, t):
    q, k, v, c = call.q, call.k, call.v, call.pack_keys
    p = call.params[st.normaliser.packed] if isinstance(st.normaliser, Nested) else None
    if st.heads is not None:
        a, b = st.heads
        q, p = q[:, a:b], (p[:, a:b] if p is not None else None)
        k, v, c = (stage_kv(st.heads, x, call.groups) for x in (k, v, c))
    ids = {name: call.runtime[name][1] for name in M.runtime_inputs(st.mask)}   # the new tokens' ids
    if getattr(st, "score", None) is not None:                                 # a scored stage reads its tables
        p = {name: call.params[name] for name in st.score.tables()}
    return cache.states[st.name].step(op, be, q, k, v, valid, ids, c, p, t)


def attend_window(op, q, k, v, key_padding_mask=None, q_offset: int = 0, k_start: int = 0):
    """`op(q, K, V, q_offset=q_offset)` for a cache that kept only the keys from position `k_start` on: k, v
    `[B, H_kv, N_k, D]` are the keys at positions k_start .. k_start + N_k - 1 (a transformers sliding-window
    cache layer). Softmax stages only; a PatternError when a stage may need a key before k_start (its mask's
    `retained(q_offset)` holds one)."""
    call = check_call(op.ir, q, k, v, key_padding_mask, 0, {})
    n, n_k = q.shape[2], k.shape[2]
    check_offset(q_offset, q.shape[0], n, k_start + n_k)
    pos = torch.arange(k_start, k_start + n_k, device=q.device)
    valid = ~key_padding_mask if key_padding_mask is not None else None
    values = {}
    for st in op.ir.stages:
        if not isinstance(st.normaliser, Softmax) or st.query != INPUT or st.keys != INPUT:
            raise PatternError(f"stage {st.name} of {op.name} needs every key from position 0, but the cache kept "
                               f"only the keys from position {k_start}", hint=_FULL_CACHE_HINT)
        first = st.mask.retained(q_offset).first()
        if first is not None and first < k_start:
            raise PatternError(f"pattern {op.name} may still attend to position {first}, but the cache kept only the "
                               f"keys from position {k_start}", hint=_FULL_CACHE_HINT)
        qs, ks, vs = q, k, v
        if st.heads is not None:
            qs, ks, vs = q[:, st.heads[0]:st.heads[1]], *(stage_kv(st.heads, x, call.groups) for x in (k, v))
        allowed = allowed_at(st.mask, n, q_offset, pos, k_start + n_k)
        if valid is not None:
            allowed = allowed & valid[:, None, :]
        scale = st.normaliser.scale if st.normaliser.scale is not None else q.shape[-1] ** -0.5
        terms = None
        if st.score is not None:                 # pointwise terms (a far field is refused by stage_state)
            stage_state(st)
            terms = score_terms(st.score, q_offset, pos, st.heads[0] if st.heads else 0, qs.shape[1], call.params)
        values[st.name] = attend_at(qs, ks, vs, allowed, scale, terms=terms)
    return _outputs(op, values)


_FULL_CACHE_HINT = "use a cache that keeps every key (in transformers: DynamicCache() without a config)"
