"""Which lowering runs a stage: the planner's choice (`plan.select.choose`) per stage and shape class, cached on
the op, and folded to a constant under torch.compile (the choice is a pure function of plain arguments)."""
from __future__ import annotations

import weakref

import torch

from ..plan.calibrate import generation
from ..plan.lowering import Problem, offset_class
from ..plan.lowering import lowering as lowering_named
from ..plan import select
from ..plan.select import pinned

_LIVE = weakref.WeakValueDictionary()     # id -> op, for `_chosen` (torch.compile calls it with constants only)


def track(op) -> None:
    """Make `op` reachable from the cached choice functions (by id; no reference kept)."""
    _LIVE[id(op)] = op


@torch.compiler.assume_constant_result
def _chosen(op_id: int, name: str, B: int, H: int, H_kv: int, n_q: int, n_k: int, D: int, Dv: int, dtype: str,
            device: str, padded: bool, grad: bool, packed: int, q_offset: int) -> str:
    """The name of the lowering for (stage, shapes, dtype, device, padding, grad, packed length, query offset),
    cached per shape class (lengths and offsets by power-of-two bucket), calibration and pins. Plain
    arguments: torch.compile folds the call to a constant."""
    op = _LIVE[op_id]
    problem = Problem(op.ir.stage(name), B, H, n_q, n_k, D, Dv, getattr(torch, dtype.split(".")[-1]),
                      torch.device(device), padded, grad, packed, kv_heads=H_kv, q_offset=q_offset)
    cls = (name, problem.shape_class(), generation(), pinned())
    found = op._lowered.get(cls)
    if found is None:
        found = op._lowered[cls] = select.choose(problem, op.backend).chosen.name
    return found


@torch.compiler.assume_constant_result
def _chosen_dynamic(op_id: int, name: str, dtype: str, device: str, padded: bool, grad: bool, packed: int,
                    grouped: bool, offset: bool) -> str:
    """The lowering for lengths torch.compile keeps symbolic: the choice at N = 4096 among the lowerings that
    run at any length (with grouped kv heads and a query offset when the call has them)."""
    op = _LIVE[op_id]
    problem = Problem(op.ir.stage(name), 1, 4, 4096, 4096, 64, 64, getattr(torch, dtype.split(".")[-1]),
                      torch.device(device), padded, grad, packed, kv_heads=2 if grouped else 4,
                      q_offset=4096 if offset else 0)
    return select.choose(problem, op.backend, any_length=True).chosen.name


def stage_lowering(op, st, q, k, v, key_padding_mask=None, packed: int = 0, q_offset: int = 0):
    """The lowering that runs stage `st` of `op` on these tensors: chosen once per shape class (see
    `plan.lowering.Problem.shape_class`), then looked up by exact shapes."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    padded = key_padding_mask is not None
    if torch.compiler.is_compiling():       # lengths may be symbolic: a choice valid at any length
        return lowering_named(_chosen_dynamic(id(op), st.name, str(q.dtype), str(q.device), padded, grad, packed,
                                              k.shape[1] != q.shape[1], q_offset != 0))
    fast = (st.name, q.shape, k.shape[1], k.shape[2], v.shape[3], q.dtype, q.device, padded, grad, packed,
            offset_class(q_offset), generation(), pinned())
    found = op._fast.get(fast)
    if found is None:
        shape = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
        found = op._fast[fast] = lowering_named(_chosen(id(op), st.name, *shape, str(q.dtype), str(q.device),
                                                        padded, grad, packed, int(q_offset)))
    return found
