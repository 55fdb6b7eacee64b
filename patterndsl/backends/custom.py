"""What the backends' `torch.library` custom ops share: a mask travels as a string key, runtime ids as tensors.

Custom ops take tensors and plain values, not IR objects, so a backend registers its static spec (the mask
and its tile choices) under a key derived from the spec's text and passes the key; the runtime ids of
`same(...)` masks travel as a flat tensor list, two tensors (query ids, key ids) per name. Softmax ops of
every backend share one signature, `fwd(q, k, v, key_padding_mask, ids, key, scale) -> (out, lse)` and
`bwd(dout, dlse, q, k, v, out, lse, key_padding_mask, ids, key, scale) -> (dq, dk, dv)`; every backend op
(softmax, linear, Luna) is made differentiable by one helper, `register_backward`.

>>> from patterndsl.ir.mask import sliding
>>> key = register("demo", sliding(2), 64)
>>> spec(key)
('demo', Band(lo=-2, hi=2, step=1), 64)
"""
from __future__ import annotations

import hashlib

import torch

from ..errors import PatternError
from ..ir import mask as M

_SPECS: dict[str, tuple] = {}
_MASKS: dict[str, M.Mask] = {}  # mask_key -> mask


def register(*spec) -> str:
    """The key of `spec` (hashable, printable values; the first names the op), registered for `spec(key)`.

    A mask whose key is known (`prime`) travels as that string, so what torch.compile folds below is a call on
    plain strings and numbers (dynamo in torch 2.11 cannot hand a frozen dataclass to a constant function); an
    unprimed mask travels as itself (torch 2.13 folds that too)."""
    return _register(*(x.__dict__.get("_custom_key", x) if isinstance(x, M.Mask) else x for x in spec))


@torch.compiler.assume_constant_result
def _register(*parts) -> str:
    """Variadic so that torch.compile sees plain arguments it can fold, not a tuple built while tracing."""
    parts = tuple(mask_key(x) if isinstance(x, M.Mask) else x for x in parts)
    key = hashlib.sha1(repr(parts).encode()).hexdigest()[:24]
    _SPECS.setdefault(key, tuple(_MASKS.get(x, x) if isinstance(x, str) else x for x in parts))
    return key


def mask_key(mask: M.Mask) -> str:
    """A string naming `mask` (its content hash), remembered on the mask; `prime` computes it before tracing."""
    key = mask.__dict__.get("_custom_key")
    if key is None:
        key = "mask:" + hashlib.sha1(repr(mask).encode()).hexdigest()[:24]
        _MASKS.setdefault(key, mask)
        object.__setattr__(mask, "_custom_key", key)  # a cache beside the fields: equality and hash ignore it
    return key


def prime(masks) -> None:
    """Compute the keys of `masks` now (when an op is built), not while torch.compile traces a call."""
    for m in masks:
        mask_key(m)


def spec(key: str) -> tuple:
    """The spec registered under `key`."""
    return _SPECS[key]


def runtime_ids(name: str, runtime: dict | None, batch: int, n_q: int, n_k: int):
    """The (query ids `[B, N_q]`, key ids `[B, N_k]`) of `same(name)`, checked."""
    ids = runtime.get(name) if runtime else None
    if ids is None:
        raise PatternError(f"the mask reads runtime ids '{name}', but none were given",
                           hint=f"pass {name}=<LongTensor [B, N]> when calling the op")
    q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
    for what, t, n in (("query", q_ids, n_q), ("key", k_ids, n_k)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() != 2 or tuple(t.shape) != (batch, n):
            got = f"{t.dtype} [{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else type(t).__name__
            raise PatternError(f"{name} ({what} ids) must be an integer tensor [{batch}, {n}], got {got}")
    return q_ids, k_ids


def flatten_ids(mask: M.Mask, runtime: dict | None, batch: int, n_q: int, n_k: int) -> list[torch.Tensor]:
    """The checked runtime ids of every `same(...)` in `mask`, as the flat list a custom op takes."""
    ids: list[torch.Tensor] = []
    for name in M.runtime_inputs(mask):
        ids += runtime_ids(name, runtime, batch, n_q, n_k)
    return ids


def unflatten_ids(mask: M.Mask, ids: list[torch.Tensor]) -> dict:
    """The runtime dict (name -> (query ids, key ids)) back from `flatten_ids`' list."""
    return {n: (ids[2 * a], ids[2 * a + 1]) for a, n in enumerate(M.runtime_inputs(mask))}


def register_backward(fwd_op, bwd_op, arrange, save_outputs: bool = True) -> None:
    """Make custom op `fwd_op` differentiable through custom op `bwd_op`: the one autograd registration of
    the backends' ops.

    The forward's tensor inputs (None and lists of tensors included) and, with `save_outputs`, its outputs
    are saved; plain values ride on the context. In the backward, `arrange(douts, inputs, outputs)` gives
    `bwd_op`'s arguments (inputs as the forward took them, outputs as it returned them); `bwd_op` returns
    the gradients of the first inputs in order, and every other input gets None (a list input a list of
    None)."""
    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        tensors, layout = [], []
        for x in inputs:
            if isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
                layout.append(("list", len(x)))
                tensors += list(x)
            elif x is None or isinstance(x, torch.Tensor):
                layout.append(("tensor", None))
                tensors.append(x)
            else:
                layout.append(("value", x))
        ctx.save_for_backward(*tensors, *(outputs if save_outputs else ()))
        ctx.layout, ctx.n_inputs = layout, len(tensors)

    def backward(ctx, *douts):
        saved = list(ctx.saved_tensors)
        inputs, k = [], 0
        for kind, x in ctx.layout:
            if kind == "value":
                inputs.append(x)
            elif kind == "tensor":
                inputs.append(saved[k])
                k += 1
            else:
                inputs.append(saved[k:k + x])
                k += x
        grads = bwd_op(*arrange(douts, inputs, tuple(saved[ctx.n_inputs:])))
        grads = tuple(grads) if isinstance(grads, (tuple, list)) else (grads,)
        rest = [[None] * x if kind == "list" else None for kind, x in ctx.layout[len(grads):]]
        return (*grads, *rest)

    fwd_op.register_autograd(backward, setup_context=setup_context)


def register_softmax_autograd(fwd_op, bwd_op) -> None:
    """Make a softmax op differentiable in q, k, v through `bwd_op` (the shared softmax signature above)."""
    register_backward(fwd_op, bwd_op, lambda d, x, o: (d[0], d[1], *x[:3], *o, *x[3:]))
