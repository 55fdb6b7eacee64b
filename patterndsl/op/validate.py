"""A call's inputs, checked once, at the op: tensors, grouped heads, query positions, padding, runtime ids,
learned params and pack keys. What passes becomes a `Call`; the layers below trust it and never re-check.

>>> import torch
>>> from patterndsl.ir import mask as M
>>> from patterndsl.ir.program import ProgramIR, Softmax, Stage
>>> ir = ProgramIR("p", (Stage("out", Softmax(), M.CAUSAL),), ("out",))
>>> q, kv = torch.zeros(2, 4, 3, 8), torch.zeros(2, 2, 10, 8)
>>> call = check_call(ir, q, kv, kv, None, 7, {})
>>> call.q_offset, call.groups
(7, 2)
>>> check_call(ir, q, kv, kv, None, -1, {})
Traceback (most recent call last):
...
patterndsl.errors.PatternError: error: q_offset must be >= 0, got -1
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PatternError
from ..inputs import check_key_padding_mask, shape_text
from ..ir import mask as M
from ..ir.program import INPUT, Nested, ProgramIR, Softmax

NESTED_KEYS = "c"          # the runtime input of causal Luna: pack keys pc(x), like k
MAX_POSITION = 1 << 31     # positions stay below 2^31 (docs/language.md §7: the front end's intervals assume it)


@dataclass
class Call:
    """A checked call. `q_offset` is one int, or a tuple of one int per batch row when they differ; `runtime`
    maps each `same(...)` name to (query ids `[B, N_q]`, key ids `[B, N_k]`); `params` holds the learned
    tensors expanded to `[B, H, l, D]`; `pack_keys` is causal Luna's `c` (like k)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    q_offset: int | tuple
    runtime: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    pack_keys: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.q.shape[1] // self.k.shape[1]


def input_names(ir: ProgramIR) -> tuple[str, ...]:
    """Keyword inputs a program's op accepts besides q, k, v, key_padding_mask and q_offset."""
    names = [n for n, _ in ir.params] + [n for n, _, _ in ir.tables]
    for st in ir.stages:
        names += M.runtime_inputs(st.mask)
        if isinstance(st.normaliser, Nested):
            names.append(NESTED_KEYS)
    return tuple(dict.fromkeys(names))


def input_hint(ir: ProgramIR, name: str) -> str:
    tables = {n: (h, w) for n, h, w in ir.tables}
    if name in tables:
        return f"pass {name}=<tensor [{tables[name][0]}, {tables[name][1]}]> (a learned bias table, q's dtype)"
    if name in dict(ir.params):
        return f"pass {name}=<tensor [{dict(ir.params)[name]}, D]> (learned packed queries)"
    if name == NESTED_KEYS:
        return "pass c=<tensor [B, H_kv, N, D]>: the pack keys pc(x) of causal Luna, shaped like k"
    return f"pass {name}=<LongTensor [B, N]> of ids for same({name})"


def check_call(ir: ProgramIR, q, k, v, key_padding_mask, q_offset, inputs: dict) -> Call:
    """Every check of `op(q, k, v, key_padding_mask, q_offset, **inputs)`, in the order a reader expects."""
    check_tensors(q, k, v)
    check_scales(ir, q.dtype)
    check_heads(ir, q, k)
    check_head_dims(ir, q, v)
    B, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    check_key_padding_mask(key_padding_mask, B, n_k)
    offset = check_offset(q_offset, B, n_q, n_k)
    check_input_names(ir, inputs)
    runtime = {name: runtime_pair(name, inputs[name], B, n_q, n_k, offset, q.device)
               for st in ir.stages for name in M.runtime_inputs(st.mask)}
    params = {name: expand_param(name, inputs[name], q, length) for name, length in ir.params}
    params.update((name, check_table(name, inputs[name], q, h, w)) for name, h, w in ir.tables)
    c = inputs.get(NESTED_KEYS)
    if NESTED_KEYS in input_names(ir):
        check_pack_keys(c, q, k)
    k, v, c = silence_padding(key_padding_mask, k, v, c)
    return Call(q, k, v, key_padding_mask, offset, runtime, params, c)


def silence_padding(key_padding_mask, *keyed):
    """Key-side tensors `[B, H_kv, N_k, ...]` with padded positions set to 0 (None passes through).

    Padding is a promise about dependence: no output may depend on a padded key. Every backend already leaves
    padded keys out of its sums, but a non-finite value there would still reach outputs through `0 * nan` in a
    matmul or a feature map's running max; zeroing them here keeps the promise for every backend at once, and
    their gradients are exactly 0."""
    if key_padding_mask is None:
        return keyed
    pad = key_padding_mask[:, None, :, None]
    return tuple(None if t is None else t.masked_fill(pad, 0) for t in keyed)


def check_scales(ir: ProgramIR, dtype: torch.dtype) -> None:
    """A softmax `scale` must survive the cast to the compute dtype: one that becomes inf gives NaN, and one that
    becomes 0 silently gives uniform weights. Half-precision inputs are scored in float32 by every backend."""
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    info = torch.finfo(dtype)
    for st in ir.stages:
        scale = st.normaliser.scale if isinstance(st.normaliser, Softmax) else None
        if scale is not None and (abs(scale) > info.max or 0 < abs(scale) < info.tiny):
            raise PatternError(f"stage '{st.name}': scale = {scale!r} is not representable in {dtype} (it would "
                               f"become {'inf' if abs(scale) > info.max else '0'})",
                               hint=f"{dtype} holds magnitudes from {info.tiny:.3g} to {info.max:.3g}; "
                                    "use a scale in that range or call with float64 tensors")


def check_tensors(q, k, v) -> None:
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise PatternError(f"{nm} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise PatternError(f"{nm} must have 4 dims [B, H, N, D], got {t.dim()} dims {shape_text(t)}")
        if not t.is_floating_point():
            raise PatternError(f"{nm} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise PatternError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise PatternError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    if D < 1 or v.shape[3] < 1:
        raise PatternError(f"head dims must be >= 1: q {shape_text(q)}, v {shape_text(v)}")
    if k.shape[0] != B or v.shape[0] != B:
        raise PatternError(f"q, k, v must share the batch: q {shape_text(q)}, k {shape_text(k)}, v {shape_text(v)}")
    if k.shape[3] != D:
        raise PatternError(f"k must have q's head dim {D}: expected [{B}, H_kv, N_k, {D}], got {shape_text(k)}")
    if v.shape[1:3] != k.shape[1:3]:
        raise PatternError(f"v must have k's heads and length: expected [{B}, {k.shape[1]}, {k.shape[2]}, D_v], "
                           f"got {shape_text(v)}")


def check_heads(ir: ProgramIR, q, k) -> None:
    """k, v have H_kv heads dividing q's H (grouped-query attention: head h reads kv head h // (H / H_kv))."""
    H, H_kv = q.shape[1], k.shape[1]
    if H_kv < 1 or H % H_kv:
        raise PatternError(f"k and v must have a number of heads dividing q's {H} (grouped-query attention), "
                           f"got {H_kv}: q {shape_text(q)}, k {shape_text(k)}",
                           hint=f"k, v are [B, H_kv, N_k, D] with H_kv in {[d for d in range(1, H + 1) if H % d == 0]}")
    if ir.num_heads is not None and H != ir.num_heads:
        raise PatternError(f"pattern {ir.name} splits {ir.num_heads} heads, but q has {H} heads {shape_text(q)}",
                           hint="set the pattern's head parameters to match")


def check_head_dims(ir: ProgramIR, q, v) -> None:
    """A stage reading keys from another stage's output needs that output's head dim to be the query's."""
    D, out = q.shape[3], {}                       # out: the head dim of each stage's output

    def dim(src: str, role: str) -> int:
        if src == INPUT:
            return v.shape[3] if role == "values" else D
        return out.get(src, D)                    # a param has q's head dim

    for st in ir.stages:
        qd, kd = dim(st.query, "queries"), dim(st.keys, "keys")
        if qd != kd:
            raise PatternError(f"stage {st.name} of {ir.name} reads keys from stage {st.keys}, whose output has head "
                               f"dim {kd} (v's), but its queries have head dim {qd}",
                               hint=f"this pattern needs v with q's head dim {D}: v [B, H_kv, N_k, {D}]")
        out[st.name] = dim(st.keys, "values")


def check_offset(q_offset, batch: int, n_q: int, n_k: int):
    """An int >= 0, or an integer tensor `[B]` (or `[]`) of them: one int, or a tuple per batch row when they
    differ. Positions stay below 2^31."""
    if isinstance(q_offset, torch.Tensor):
        if q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool or q_offset.dim() > 1 or (
                q_offset.dim() == 1 and q_offset.shape[0] != batch):
            raise PatternError(f"q_offset must be an int or an integer tensor [{batch}] (one per batch row), got "
                               f"{q_offset.dtype} {shape_text(q_offset)}")
        values = [int(x) for x in q_offset.reshape(-1).tolist()] or [0]
    elif isinstance(q_offset, int) and not isinstance(q_offset, bool):
        values = [q_offset]
    else:
        raise PatternError(f"q_offset must be an int or an integer tensor [{batch}], got {type(q_offset).__name__}")
    if min(values) < 0:
        raise PatternError(f"q_offset must be >= 0, got {min(values)}")
    if max(values) + n_q > MAX_POSITION:
        raise PatternError(f"positions must stay below 2^31: q_offset {max(values)} + N_q {n_q} puts the last query "
                           f"at position {max(values) + n_q - 1}")
    if n_k > MAX_POSITION:
        raise PatternError(f"positions must stay below 2^31: N_k is {n_k}")
    if len(set(values)) == 1:
        return values[0]
    return tuple(values)


def check_input_names(ir: ProgramIR, inputs: dict) -> None:
    allowed = input_names(ir)
    for name in inputs:
        if name not in allowed:
            raise PatternError(f"unexpected input '{name}' for pattern {ir.name}",
                               hint=f"it takes: {', '.join(allowed)}" if allowed else "it takes only q, k, v")
    for name in allowed:
        if name not in inputs:
            raise PatternError(f"pattern {ir.name} needs the input '{name}'", hint=input_hint(ir, name))


def _ids_text(t) -> str:
    return f"{t.dtype} {shape_text(t)}" if isinstance(t, torch.Tensor) else type(t).__name__


def runtime_pair(name: str, ids, batch: int, n_q: int, n_k: int, offset, device):
    """The (query ids `[B, N_q]`, key ids `[B, N_k]`) of `same(name)`: given as that pair, or as one tensor
    `[B, L]` of the ids of positions 0 .. L-1 with L = max(N_k, q_offset + N_q)."""
    if not isinstance(ids, (tuple, list)):
        top = max(offset) if isinstance(offset, tuple) else offset
        length = max(n_k, top + n_q)
        if top == 0 and n_q == n_k:
            ids = (ids, ids)
        elif not (isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and ids.dim() == 2
                  and tuple(ids.shape) == (batch, length)):
            raise PatternError(f"{name} must be an integer tensor [{batch}, {length}] (the ids of positions 0 .. "
                               f"{length - 1}) or a pair (query ids [{batch}, {n_q}], key ids [{batch}, {n_k}]), "
                               f"got {_ids_text(ids)}")
        else:
            rows = offset if isinstance(offset, tuple) else (offset,) * batch
            q_ids = torch.stack([ids[b, o:o + n_q] for b, o in enumerate(rows)]) if batch else ids[:, :n_q]
            ids = (q_ids, ids[:, :n_k])
    if len(ids) != 2:
        raise PatternError(f"{name} must be an id tensor or a pair (query ids, key ids), got {len(ids)} items")
    for what, t, n in (("query", ids[0], n_q), ("key", ids[1], n_k)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dim() != 2 or tuple(t.shape) != (batch, n):
            raise PatternError(f"{name} ({what} ids) must be an integer tensor [{batch}, {n}], got {_ids_text(t)}")
        if t.device != device:
            raise PatternError(f"{name} ids must be on q's device {device}, got {t.device}")
    return ids[0], ids[1]


def expand_param(name: str, t, q, length: int) -> torch.Tensor:
    """A learned tensor `[l, D]`, `[H, l, D]` or `[B, H, l, D]` of q's dtype and device, as `[B, H, l, D]`."""
    B, H, _, D = q.shape
    if not isinstance(t, torch.Tensor):
        raise PatternError(f"{name} must be a tensor [{length}, {D}], got {type(t).__name__}")
    if t.dtype != q.dtype or t.device != q.device:
        raise PatternError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    ok = t.dim() in (2, 3, 4) and tuple(t.shape[-2:]) == (length, D) and (
        t.dim() == 2 or (t.shape[-3] == H and (t.dim() == 3 or t.shape[0] == B)))
    if not ok:
        raise PatternError(f"{name} must be [{length}, {D}], [{H}, {length}, {D}] or [{B}, {H}, {length}, {D}], "
                           f"got {shape_text(t)}")
    return t.expand(B, H, length, D)


def check_pack_keys(c, q, k) -> None:
    """Causal Luna's pack keys `c`: like k (`[B, H_kv, N_k, D]`, q's dtype and device)."""
    if not isinstance(c, torch.Tensor) or tuple(c.shape) != tuple(k.shape) or c.dtype != q.dtype:
        raise PatternError(f"c (pack keys) must be like k: {q.dtype} {shape_text(k)}, got "
                           f"{getattr(c, 'dtype', type(c).__name__)} {shape_text(c)}")
    if c.device != q.device:
        raise PatternError(f"c (pack keys) must be on q's device {q.device}, got {c.device}")


def check_table(name: str, t, q, heads: int, width: int) -> torch.Tensor:
    """A learned bias table `[heads, width]` of q's dtype and device; `heads` must be q's head count."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (heads, width):
        raise PatternError(f"{name} (a bias table) must be a tensor [{heads}, {width}], got {shape_text(t)}")
    if t.dtype != q.dtype or t.device != q.device:
        raise PatternError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, {t.device}")
    if q.shape[1] != heads:
        raise PatternError(f"{name} has one row per head ({heads}), but q has {q.shape[1]} heads",
                           hint="set the pattern's head count to match q")
    return t
