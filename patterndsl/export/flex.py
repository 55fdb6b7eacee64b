"""Export to FlexAttention: a `mask_mod(b, h, q_idx, kv_idx)` built from the IR mask, and its BlockMask.

Each IR node's one pointwise definition (`Mask.at`) runs with `FlexOps`, pointwise torch ops on the index
tensors, so the function runs under FlexAttention's `vmap` and under `torch.compile`: no Python branch looks
at a tensor value, and index sets, drawn random blocks and runtime ids are captured tensors read by clamped
gathers. With `q_offset = o`, query row `q_idx` is at absolute position `o + q_idx` (a decode step, a chunk
of a long prompt).

>>> import torch, patterndsl as pd
>>> from torch.nn.attention.flex_attention import create_mask
>>> op = pd.compile("sliding_window", window=4, backend="reference")
>>> mask_mod = to_flex(op)
>>> bool((create_mask(mask_mod, None, None, 16, 16)[0, 0] == op.mask(16)).all())
True
"""
from __future__ import annotations

import copy

import torch

from ..errors import PatternError
from ..ir import mask as M

_UNROLL = 8            # index sets up to this size compare element by element; larger ones use a table
_TABLE_LIMIT = 1 << 26  # largest membership table (entries) an index set may need


class FlexOps:
    """The mask ops (`ir/masks/base.py`) for `mask_mod` bodies: Python values stay Python (constants fold),
    tensors get pointwise torch ops; division and remainder by zero give 0 as in `predicate.TorchOps`. Index
    sets, drawn random blocks and runtime ids are captured tensors read by clamped gathers, built once (by a
    probe evaluation in `mask_fn`) and shared by every call through `bind(b)`."""

    def __init__(self, n_q: int | None = None, n_k: int | None = None, runtime: dict | None = None, device=None,
                 q_offset: int = 0):
        self.n_q, self.n_k, self.runtime, self.device, self.q_offset = n_q, n_k, runtime or {}, device, q_offset
        self.data: dict = {}
        self.b = None

    def bind(self, b) -> "FlexOps":
        """These ops for batch index `b` (sharing the captured data)."""
        out = copy.copy(self)
        out.b = b
        return out

    def const(self, v):
        return v

    def bin(self, op, a, b):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if not isinstance(b, torch.Tensor):
            if b == 0:
                return a * 0
            if not isinstance(a, torch.Tensor):
                return a // b if op == "//" else a % b
            return torch.div(a, b, rounding_mode="floor") if op == "//" else torch.remainder(a, b)
        zero = b == 0
        safe = torch.where(zero, torch.ones_like(b), b)
        a = a if isinstance(a, torch.Tensor) else torch.full_like(b, a)
        r = torch.div(a, safe, rounding_mode="floor") if op == "//" else torch.remainder(a, safe)
        return torch.where(zero, torch.zeros_like(r), r)

    def call(self, func, args):
        tensors = [x for x in args if isinstance(x, torch.Tensor)]
        if not tensors:
            return abs(args[0]) if func == "abs" else (min(args) if func == "min" else max(args))
        if func == "abs":
            return torch.abs(args[0])
        a, b = (x if isinstance(x, torch.Tensor) else torch.full_like(tensors[0], x) for x in args)
        return torch.minimum(a, b) if func == "min" else torch.maximum(a, b)

    def cmp(self, op, a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
        if not isinstance(a, torch.Tensor):  # put the tensor on the left
            a, b, op = b, a, {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        return {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge,
                "==": torch.eq, "!=": torch.ne}[op](a, b)

    def logic(self, op, a, b=None):
        a, b = _cond(a), _cond(b)
        if op == "not":
            return (not a) if not isinstance(a, torch.Tensor) else ~a
        for x, y in ((a, b), (b, a)):  # fold a constant side
            if not isinstance(x, torch.Tensor):
                if op == "and":
                    return y if x else False
                return True if x else y
        return (a & b) if op == "and" else (a | b)

    # ----------------------------------------------------------------------------------------------- data
    def member(self, x, idx: frozenset, side: str):
        key = ("member", idx, side)
        if key not in self.data:
            n = self.n_k if side == "k" else (None if self.n_q is None else self.q_offset + self.n_q)
            self.data[key] = _members(idx, n, self.device)
        return self.data[key](x)

    def lookup(self, node, row, value):
        if node not in self.data:
            if self.n_q is None or self.n_k is None:
                raise PatternError(f"{node.source()} draws its blocks for given sequence lengths, so its mask_mod "
                                   "needs them", hint="pass n_q= and n_k= to to_flex (flex_block_mask does this for you)")
            table = node.table(self.q_offset + self.n_q, self.n_k).to(self.device)       # [rows, width]
            self.data[node] = (table.shape[0] - 1, [table[:, c].contiguous() for c in range(table.shape[1])])
        last, columns = self.data[node]
        r = torch.clamp(row, 0, last)
        out = columns[0][r] == value
        for col in columns[1:]:
            out = out | (col[r] == value)
        return out

    def ids(self, name: str, side: str, x):
        key = ("ids", name)
        if key not in self.data:
            self.data[key] = _ids(name, self.runtime, self.device)
        q_ids, k_ids = self.data[key]
        if side == "q":
            return q_ids[self.b, torch.clamp(x - self.q_offset, 0, q_ids.shape[1] - 1)]
        return k_ids[self.b, torch.clamp(x, 0, k_ids.shape[1] - 1)]


def _cond(x):
    """x as a condition: a number is true where it is not 0 (as in Python)."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == torch.bool else x != 0
    return x if x is None else bool(x)


def _bool(value, q, kv):
    """A constant as a bool tensor shaped like the broadcast index tensors."""
    t = torch.ones_like(q - kv, dtype=torch.bool)
    return t if value else ~t


def _members(idx: frozenset, n: int | None, device):
    """`x -> x in idx` as pointwise ops: unrolled for small sets, a clamped gather into a table otherwise."""
    if n is not None:
        idx = frozenset(x for x in idx if x < n)
    if not idx:
        return lambda x: x < 0
    if len(idx) <= _UNROLL:
        items = sorted(idx)

        def small(x):
            out = x == items[0]
            for v in items[1:]:
                out = out | (x == v)
            return out
        return small
    size = max(idx) + 1
    if size > _TABLE_LIMIT:
        raise PatternError(f"index set up to {size - 1} is too large to export to FlexAttention",
                           hint="pass the sequence lengths (n_q=, n_k=) so indices beyond them are dropped")
    table = torch.zeros(size, dtype=torch.bool, device=device)
    table[torch.tensor(sorted(idx), dtype=torch.long, device=device)] = True
    last = size - 1

    def big(x):
        return table[torch.clamp(x, 0, last)] & (x <= last)
    return big


def _ids(name: str, runtime: dict, device):
    if name not in runtime:
        raise PatternError(f"the mask reads runtime ids '{name}', so its mask_mod needs them",
                           hint=f"pass runtime={{'{name}': <LongTensor [B, N]>}} to to_flex")
    ids = runtime[name]
    q_ids, k_ids = ids if isinstance(ids, (tuple, list)) else (ids, ids)
    for what, t in (("query ids", q_ids), ("key ids", k_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise PatternError(f"{what} for same({name}) must be a tensor [B, N], got {got}")
    return q_ids.to(device), k_ids.to(device)


def mask_fn(m: M.Mask, n_q=None, n_k=None, runtime=None, device=None, q_offset: int = 0):
    """`f(b, q_idx, kv_idx) -> bool tensor` computing mask `m` pointwise (the body of a mask_mod); query row
    `q_idx` is at position `q_offset + q_idx`."""
    ops = FlexOps(n_q, n_k, runtime, device, q_offset)
    probe = torch.zeros(1, dtype=torch.long, device=device)
    m.at(probe + q_offset, probe, ops.bind(probe))      # builds the captured data now (errors surface here)

    def mod(b, q, kv):
        out = m.at(q + q_offset if q_offset else q, kv, ops.bind(b))
        return out & _bool(True, q, kv) if isinstance(out, torch.Tensor) else _bool(bool(out), q, kv)
    return mod


def _stages(op, stage: str | None):
    """(head range or None, stage) pairs whose masks make up `op.mask(..., stage=stage)`."""
    if stage is None and op.ir.by_heads:
        return [(op.ir.stage(o).heads, op.ir.stage(o)) for o in op.ir.outputs]
    return [(None, op._mask_stage(stage))]


def to_flex(op, stage: str | None = None, *, n_q: int | None = None, n_k: int | None = None,
            runtime: dict | None = None, device=None, q_offset: int = 0, score_mod: bool = False,
            tables: dict | None = None):
    """A FlexAttention `mask_mod(b, h, q_idx, kv_idx)` whose mask equals `op.mask(n_q, n_k, stage)`; with
    `score_mod=True` the pair `(mask_mod, score_mod)`, the score terms as `score_mod(score, b, h, q_idx, kv_idx)`
    (identity for stages without terms; `tables` maps bias tables to tensors `[H, width]`, see
    `export/flex_scores.py`).

    Per-head programs (`heads[a:b] attend ...`) select each head's mask by `h`. `random(...)` masks need
    the lengths `n_q`, `n_k` (the draw depends on them); `same(name)` masks need `runtime={name: ids}`
    with ids `[B, N]` (or a pair `(q_ids [B, N_q], k_ids [B, N_k])`). Captured tensors live on `device`.
    With `q_offset = o`, query row `q_idx` is at position `o + q_idx`: the mask_mod gives rows o .. o + n_q - 1
    of the mask of `o + n_q` queries (`random` draws for those `o + n_q`).
    The mask_mod reproduces the mask; `flex_attention` with it reproduces the op only for softmax stages.
    """
    n_k = n_q if n_k is None else n_k
    for nm, n in (("n_q", n_q), ("n_k", n_k)):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise PatternError(f"{nm} must be an int >= 0, got {n!r}")
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise PatternError(f"q_offset must be an int >= 0, got {q_offset!r}")
    if runtime is not None and not isinstance(runtime, dict):
        raise PatternError(f"runtime must be a dict of id tensors, got {type(runtime).__name__}")
    pieces = [(heads, mask_fn(st.mask, n_q, n_k, runtime, device, q_offset)) for heads, st in _stages(op, stage)]
    if len(pieces) == 1:
        only = pieces[0][1]

        def mask_mod(b, h, q_idx, kv_idx):
            return only(b, q_idx, kv_idx)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            out = pieces[-1][1](b, q_idx, kv_idx)
            for (_, stop), f in reversed(pieces[:-1]):
                out = torch.where(h < stop, f(b, q_idx, kv_idx), out)
            return out
    mask_mod.__name__ = f"{op.name}_mask_mod"
    mask_mod.__qualname__ = mask_mod.__name__
    if score_mod:
        from .flex_scores import score_mod_of
        return mask_mod, score_mod_of(_stages(op, stage), tables, q_offset)
    return mask_mod


def flex_block_mask(op, B: int | None, H: int | None, n_q: int, n_k: int | None = None, device="cpu",
                    BLOCK_SIZE: int | tuple[int, int] = 128, stage: str | None = None,
                    runtime: dict | None = None, q_offset: int = 0):
    """The FlexAttention `BlockMask` of `op`'s mask for `[B, H, n_q, D]` queries and `n_k` keys.

    `B` and `H` may be None (broadcast) unless the mask reads runtime ids (per batch) or differs per head.

    >>> import patterndsl as pd
    >>> bm = flex_block_mask(pd.compile("sliding_window", window=4), None, None, 256, BLOCK_SIZE=64)
    >>> bm.shape
    (1, 1, 256, 256)
    """
    from torch.nn.attention.flex_attention import create_block_mask
    n_k = n_q if n_k is None else n_k
    for nm, n in (("B", B), ("H", H)):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise PatternError(f"{nm} must be an int >= 1 or None, got {n!r}")
    if stage is None and op.ir.by_heads and H is not None and H != op.ir.num_heads:
        raise PatternError(f"pattern {op.name} splits {op.ir.num_heads} heads, got H={H}")
    if stage is None and op.ir.by_heads and H is None:
        H = op.ir.num_heads
    reads = sorted({n for _, st in _stages(op, stage) for n in M.runtime_inputs(st.mask)})
    if reads and B is None:
        raise PatternError(f"the mask reads runtime ids ({', '.join(reads)}) per batch element, so B cannot be None",
                           hint="pass the batch size B matching the ids [B, N]")
    mask_mod = to_flex(op, stage, n_q=n_q, n_k=n_k, runtime=runtime, device=device, q_offset=q_offset)
    return create_block_mask(mask_mod, B, H, n_q, n_k, device=device, BLOCK_SIZE=BLOCK_SIZE)
