"""The op's fast path: a call like an earlier one skips the checks it already passed.

Every check of `validate.check_call` depends only on the tensors' types, shapes, dtypes and devices, the padding
mask's dtype and shape, the query offset (an int) and the keyword inputs, except the padding mask's values,
which `silence_padding` reads on every call. So once a call has passed, a later call with the same `call_key`
would pass again: it runs a callable prepared for that key (`prepare`) without re-checking. The key also holds
whether autograd records the call, the calibration generation and the pinned lowerings, so a change in any of
them plans again. Calls with keyword inputs (runtime ids, learned tensors, pack keys), a tensor of offsets or
tensor subclasses take the full path every time.

The prepared callable of a one-stage softmax program reading q, k, v directly is its lowering's `bind` (the
lowering's work that depends only on the key done once, e.g. the dense mask looked up) or its `run` with the
scale and offset fixed; any other program runs its stage graph on a `Call` built without re-checking.
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import INPUT, Softmax
from ..plan.calibrate import generation
from ..plan.select import pinned
from .graph import run_graph
from .lowered import stage_lowering
from .validate import Call, silence_padding

MAX_KEYS = 64          # prepared callables kept per op (a loop over many offsets or shapes starts again)
_TENSOR = torch.Tensor


def call_key(q, k, v, key_padding_mask, q_offset, inputs) -> tuple | None:
    """What a call's checks depend on (None: this call takes the full path)."""
    if inputs or type(q_offset) is not int or type(q) is not _TENSOR or type(k) is not _TENSOR \
            or type(v) is not _TENSOR:
        return None
    if key_padding_mask is None:
        pad = None
    elif type(key_padding_mask) is _TENSOR:
        pad = (key_padding_mask.dtype, key_padding_mask.shape, key_padding_mask.device)
    else:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, pad, q_offset,
            grad, generation(), pinned())


def _single_softmax(ir):
    """The one softmax stage of a program that returns it and reads q, k, v directly (else None)."""
    if len(ir.stages) != 1 or ir.params or ir.tables or ir.by_heads:
        return None
    st = ir.stages[0]
    plain = (st.query == INPUT and st.keys == INPUT and st.heads is None and st.score is None
             and isinstance(st.normaliser, Softmax) and ir.outputs == (st.name,) and not M.runtime_inputs(st.mask))
    return st if plain else None


def prepare(op, q, k, v, key_padding_mask, q_offset: int, backends: dict):
    """A callable `(q, k, v, key_padding_mask) -> outputs` for calls with this call's key."""
    st = _single_softmax(op.ir)
    if st is None or 0 in q.shape or 0 in k.shape:
        def graph(q, k, v, kpm):
            k, v = silence_padding(kpm, k, v)
            return run_graph(op, Call(q, k, v, kpm, q_offset), backends)
        return graph
    low = stage_lowering(op, st, q, k, v, key_padding_mask, 0, q_offset)
    scale = st.normaliser.scale if st.normaliser.scale is not None else q.shape[-1] ** -0.5
    bound = low.bind(st, q, k, v, scale, key_padding_mask is not None, q_offset) if low.bind else None
    be_name = backends[st.name].name

    def stage(q, k, v, kpm):
        k, v = silence_padding(kpm, k, v)
        try:
            if bound is not None:
                return bound(q, k, v, kpm)
            return low.run(st, q, k, v, scale=scale, key_padding_mask=kpm, runtime={}, q_offset=q_offset)
        except PatternError as e:          # named as `graph.run_stage` names it
            raise PatternError(f"stage {st.name} of {op.name} on the {be_name} backend: {e.message}", e.span,
                               e.source, e.hint) from None
    return stage


def remember(op, key, fn) -> None:
    if len(op._ready) >= MAX_KEYS:
        op._ready.clear()
    op._ready[key] = fn
