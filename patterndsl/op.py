"""`AttentionOp`: a compiled program. It validates inputs, runs the stage graph on the chosen backends, and
returns the program's outputs.

>>> import torch, patterndsl as pd
>>> op = pd.compile("longformer", window=4, backend="reference")
>>> q = k = v = torch.randn(1, 2, 8, 4)
>>> op(q, k, v).shape
torch.Size([1, 2, 8, 4])
"""
from __future__ import annotations

import weakref

import torch

from .errors import PatternError
from .ir import mask as M
from .ir.dense import dense_mask
from .ir.program import INPUT, Linear, Nested, ProgramIR, Softmax, Stage
from .plan.calibrate import generation
from .plan.lowering import lowering as _lowering_named
from .plan.select import pinned

OP_OPTIONS = ("projection",)
NESTED_KEYS = "c"
MAX_DENSE_PAIRS = 1 << 32  # op.mask: 4 GiB of bool  # the runtime input of causal Luna: pack keys pc(x) [B, H, N, D]


_LIVE = weakref.WeakValueDictionary()     # id -> op, for `_chosen` (torch.compile calls it with constants only)


@torch.compiler.assume_constant_result
def _chosen(op_id: int, name: str, B: int, H: int, n_q: int, n_k: int, D: int, Dv: int, dtype: str, device: str,
            padded: bool, grad: bool, packed: int) -> str:
    """The name of the lowering for (stage, shapes, dtype, device, padding, grad, packed length), cached per
    shape class (lengths by power-of-two bucket), calibration and pins. Plain arguments: torch.compile folds
    the call to a constant."""
    from .plan.lowering import Problem
    from .plan.select import choose
    op = _LIVE[op_id]
    problem = Problem(op.ir.stage(name), B, H, n_q, n_k, D, Dv, getattr(torch, dtype.split(".")[-1]),
                      torch.device(device), padded, grad, packed)
    cls = (name, problem.shape_class(), generation(), pinned())
    found = op._lowered.get(cls)
    if found is None:
        found = op._lowered[cls] = choose(problem, op.backend).chosen.name
    return found


@torch.compiler.assume_constant_result
def _chosen_dynamic(op_id: int, name: str, dtype: str, device: str, padded: bool, grad: bool, packed: int) -> str:
    """The lowering for lengths torch.compile keeps symbolic: the choice at N = 4096 among the lowerings that
    run at any length."""
    from .plan.lowering import Problem
    from .plan.select import choose
    op = _LIVE[op_id]
    problem = Problem(op.ir.stage(name), 1, 4, 4096, 4096, 64, 64, getattr(torch, dtype.split(".")[-1]),
                      torch.device(device), padded, grad, packed)
    return choose(problem, op.backend, any_length=True).chosen.name


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _shape(t) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


class AttentionOp:
    """Call as `op(q, k, v, key_padding_mask=None, **inputs)` with q `[B, H, N_q, D]`, k `[B, H, N_k, D]`,
    v `[B, H, N_k, D_v]`; `key_padding_mask` `[B, N_k]` bool, True = padding (ignored keys). `inputs` are the
    program's learned tensors (`p=` for Luna: `[l, D]`, `[H, l, D]` or `[B, H, l, D]`), runtime ids for
    `same(name)` masks (`name=` LongTensor `[B, N]`), and `c=` (pack keys `[B, H, N, D]`) for causal Luna.
    Returns one tensor `[B, H, N_q, D_v]`, or a tuple when the program returns several (Luna: out, packed).
    """

    def __init__(self, program, ir: ProgramIR, backend: str = "auto", projection=None):
        from .backends import BACKEND_NAMES
        if not isinstance(backend, str):
            raise PatternError(f"backend must be a name (auto, {', '.join(BACKEND_NAMES)}), got {backend!r}")
        if backend not in BACKEND_NAMES + ("auto",):
            from .errors import did_you_mean
            raise PatternError(f"unknown backend '{backend}'",
                               hint=did_you_mean(backend, BACKEND_NAMES) or f"one of: auto, {', '.join(BACKEND_NAMES)}")
        self.program = program
        self.ir = ir
        self.backend = backend
        self._projection_given = projection
        self._check_projection_given()
        self._projections: dict = {}
        self._draws: dict[str, int] = {}
        self._choice: dict = {}
        self._resolved: dict = {}
        self._lowered: dict = {}     # (stage, shape class, calibration, pins) -> the lowering it runs with
        self._fast: dict = {}        # (stage, exact shapes, ..., calibration, pins) -> that lowering
        self._runtime_names = tuple(dict.fromkeys(n for st in ir.stages for n in M.runtime_inputs(st.mask)))
        self._inputs = self._input_names()
        _LIVE[id(self)] = self
        try:  # resolve imports now, not while torch.compile traces a call; a device it cannot use errors there
            self._stage_backends(_default_device())
        except PatternError:
            pass

    # ---------------------------------------------------------------------------------------------- inputs
    @property
    def name(self) -> str:
        return self.ir.name

    def input_names(self) -> tuple[str, ...]:
        """Keyword inputs the op accepts besides q, k, v, key_padding_mask."""
        return self._inputs

    def _input_names(self) -> tuple[str, ...]:
        names = [n for n, _ in self.ir.params]
        for st in self.ir.stages:
            names += M.runtime_inputs(st.mask)
            if isinstance(st.normaliser, Nested):
                names.append(NESTED_KEYS)
        return tuple(dict.fromkeys(names))

    def _validate(self, q, k, v, key_padding_mask, inputs):
        for nm, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise PatternError(f"{nm} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
            if t.dim() != 4:
                raise PatternError(f"{nm} must have 4 dims [B, H, N, D], got {t.dim()} dims {_shape(t)}")
            if not t.is_floating_point():
                raise PatternError(f"{nm} must be floating point, got {t.dtype}")
        if not (q.dtype == k.dtype == v.dtype):
            raise PatternError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise PatternError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        B, H, _, D = q.shape
        if D < 1 or v.shape[3] < 1:
            raise PatternError(f"head dims must be >= 1: q {_shape(q)}, v {_shape(v)}")
        if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
            raise PatternError(f"q, k, v must share batch and heads: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
        if k.shape[3] != D:
            raise PatternError(f"k must have q's head dim {D}: expected [{B}, {H}, N_k, {D}], got {_shape(k)}")
        if v.shape[2] != k.shape[2]:
            raise PatternError(f"v must have k's length {k.shape[2]}: expected [{B}, {H}, {k.shape[2]}, D_v], "
                               f"got {_shape(v)}")
        if self.ir.num_heads is not None and H != self.ir.num_heads:
            raise PatternError(f"pattern {self.name} splits {self.ir.num_heads} heads, but q has {H} heads "
                               f"{_shape(q)}", hint="set the pattern's head parameters to match")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
                raise PatternError(f"key_padding_mask must be a bool tensor [B, N_k], got {got}")
            if tuple(key_padding_mask.shape) != (B, k.shape[2]):
                raise PatternError(f"key_padding_mask must be [{B}, {k.shape[2]}] (batch, keys), "
                                   f"got {_shape(key_padding_mask)}")
        allowed = self.input_names()
        for name in inputs:
            if name not in allowed:
                raise PatternError(f"unexpected input '{name}' for pattern {self.name}",
                                   hint=f"it takes: {', '.join(allowed)}" if allowed else "it takes only q, k, v")
        for name in allowed:
            if name not in inputs:
                raise PatternError(f"pattern {self.name} needs the input '{name}'", hint=self._input_hint(name))
        if not self._runtime_names:
            return
        from .backends.custom import runtime_ids   # not at import time: it loads torch._dynamo (and triton)
        for st in self.ir.stages:
            for name in M.runtime_inputs(st.mask):
                for ids in runtime_ids(name, inputs, B, q.shape[2], k.shape[2]):
                    if ids.device != q.device:
                        raise PatternError(f"{name} ids must be on q's device {q.device}, got {ids.device}")

    def _input_hint(self, name: str) -> str:
        if name in dict(self.ir.params):
            return f"pass {name}=<tensor [{dict(self.ir.params)[name]}, D]> (learned packed queries)"
        if name == NESTED_KEYS:
            return "pass c=<tensor [B, H, N, D]>: the pack keys pc(x) of causal Luna"
        return f"pass {name}=<LongTensor [B, N]> of ids for same({name})"

    def _param(self, name: str, t, q) -> torch.Tensor:
        length = dict(self.ir.params)[name]
        B, H, _, D = q.shape
        if not isinstance(t, torch.Tensor):
            raise PatternError(f"{name} must be a tensor [{length}, {D}], got {type(t).__name__}")
        if t.dtype != q.dtype or t.device != q.device:
            raise PatternError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                               f"got {t.dtype}, {t.device}")
        ok = t.dim() in (2, 3, 4) and tuple(t.shape[-2:]) == (length, D) and (
            t.dim() == 2 or (t.shape[-3] == H and (t.dim() == 3 or t.shape[0] == B)))
        if not ok:
            raise PatternError(f"{name} must be [{length}, {D}], [{H}, {length}, {D}] or [{B}, {H}, {length}, {D}], "
                               f"got {_shape(t)}")
        return t.expand(B, H, length, D)

    # ----------------------------------------------------------------------------------------------- running
    def backends(self, device: torch.device | str = "cpu") -> dict[str, str]:
        """The backend chosen for each stage on `device`."""
        device = torch.device(device)
        if device not in self._choice:
            from .backends import declare_all
            from .plan.select import select_backends
            declare_all()
            self._choice[device] = select_backends(self.ir, self.backend, device)
        return self._choice[device]

    def _stage_backends(self, device: torch.device) -> dict:
        """Backend objects per stage on `device` (imported once; the call path does no imports)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._resolved:
            from .backends import get_backend
            self._resolved[device] = {n: get_backend(b) for n, b in self.backends(device).items()}
        return self._resolved[device]

    def __call__(self, q, k, v, key_padding_mask=None, **inputs):
        self._validate(q, k, v, key_padding_mask, inputs)
        runtime = {n: inputs[n] for n in self._runtime_names}
        values = {n: self._param(n, inputs[n], q) for n, _ in self.ir.params}
        backends = self._resolved.get(q.device) or self._stage_backends(q.device)
        for st in self.ir.stages:
            qs = q if st.query == INPUT else values[st.query]
            ks, vs = (k, v) if st.keys == INPUT else (values[st.keys], values[st.keys])
            kpm = key_padding_mask if st.keys == INPUT else None
            if st.heads is not None:
                a, b = st.heads
                qs, ks, vs = qs[:, a:b], ks[:, a:b], vs[:, a:b]
            values[st.name] = self._run(backends[st.name], st, qs, ks, vs, kpm, runtime, values, inputs)
        if self.ir.by_heads:
            return torch.cat([values[o] for o in self.ir.outputs], dim=1)
        outs = tuple(values[o] for o in self.ir.outputs)
        return outs[0] if len(outs) == 1 else outs

    def lowering(self, st: Stage, q, k, v, key_padding_mask=None, packed: int = 0):
        """The lowering that runs stage `st` on these tensors: chosen once per shape class (lengths by
        power-of-two bucket; see `plan.lowering.Problem.shape_class`), then looked up."""
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if torch.compiler.is_compiling():       # lengths may be symbolic: a choice valid at any length
            return _lowering_named(_chosen_dynamic(id(self), st.name, str(q.dtype), str(q.device),
                                                   key_padding_mask is not None, grad, packed))
        fast = (st.name, q.shape, k.shape[2], v.shape[3], q.dtype, q.device, key_padding_mask is not None, grad,
                packed, generation(), pinned())
        found = self._fast.get(fast)
        if found is None:
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
            found = self._fast[fast] = _lowering_named(_chosen(id(self), st.name, *shape, str(q.dtype),
                                                               str(q.device), key_padding_mask is not None, grad,
                                                               packed))
        return found

    def _run(self, be, st: Stage, q, k, v, kpm, runtime, values, inputs):
        norm = st.normaliser
        if isinstance(norm, Softmax):
            scale = norm.scale if norm.scale is not None else q.shape[-1] ** -0.5
            return self.lowering(st, q, k, v, kpm).run(st, q, k, v, scale=scale, key_padding_mask=kpm,
                                                       runtime=runtime)
        if isinstance(norm, Linear):
            if q.shape[2] == 0 or k.shape[2] == 0:   # no query, or no key: rows with no key output zeros
                tied = (q.sum() + k.sum() + v.sum()) * 0   # keeps the graph, so backward gives zero grads
                return q.new_zeros(*q.shape[:3], v.shape[3]) + tied
            w = self.projection(st, q.shape[-1], q.device, q.dtype)
            return self.lowering(st, q, k, v, kpm).run(st, q, k, v, projection=w, key_padding_mask=kpm)
        c = inputs[NESTED_KEYS]
        if not isinstance(c, torch.Tensor) or tuple(c.shape) != tuple(k.shape) or c.dtype != q.dtype:
            raise PatternError(f"c (pack keys) must be like k: {q.dtype} {_shape(k)}, got "
                               f"{getattr(c, 'dtype', type(c).__name__)} {_shape(c)}")
        p = values[norm.packed]
        if st.heads is not None:
            p, c = p[:, st.heads[0]:st.heads[1]], c[:, st.heads[0]:st.heads[1]]
        return self.lowering(st, q, k, v, kpm, p.shape[2]).run(st, q, k, v, p=p, c=c, key_padding_mask=kpm)

    # ------------------------------------------------------------------------------------------ projections
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
                from .errors import did_you_mean
                raise PatternError(f"projection for '{name}': no random-feature stage of that name in {self.name}",
                                   hint=did_you_mean(str(name), features) or f"stages: {', '.join(features)}")
            ok = isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2 and w.shape[0] == features[name]
            if not ok:
                raise PatternError(f"projection for stage {name} must be a float tensor [{features[name]}, head_dim] "
                                   f"(features, head_dim), got {_shape(w)}")

    def projection(self, stage: Stage, head_dim: int, device, dtype) -> torch.Tensor | None:
        """The random-feature matrix `[m, head_dim]` of a linear stage (None for elu1): user-given or drawn
        from the feature map's seed (and the redraw count)."""
        from .backends.reference.features import draw_projection
        fm = stage.normaliser.feature_map
        if not hasattr(fm, "features"):
            return None
        given = self._projection_given
        if isinstance(given, dict):
            given = given.get(stage.name)
        if given is not None:
            if not isinstance(given, torch.Tensor) or tuple(given.shape) != (fm.features, head_dim):
                raise PatternError(f"projection for stage {stage.name} must be a tensor [{fm.features}, {head_dim}] "
                                   f"(features, head_dim), got {_shape(given)}")
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

    # ------------------------------------------------------------------------------------------- inspection
    def _mask_stage(self, stage: str | None) -> Stage:
        if stage is not None:
            try:
                return self.ir.stage(stage)
            except KeyError:
                raise PatternError(f"no stage '{stage}' in {self.name}",
                                   hint=f"stages: {', '.join(s.name for s in self.ir.stages)}") from None
        return self.ir.stage(self.ir.outputs[0])

    def mask(self, n_q: int, n_k: int | None = None, stage: str | None = None, runtime: dict | None = None,
             device=None) -> torch.Tensor:
        """The exact dense bool mask `[n_q, n_k]` (True = allowed) of a stage (default: the first output).

        Per-head programs give `[H, n_q, n_k]`, one mask per head; `runtime` supplies ids for `same(...)`.
        """
        for nm, n in (("n_q", n_q), ("n_k", n_k)):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise PatternError(f"{nm} must be an int >= 0, got {n!r}")
        if n_q * (n_q if n_k is None else n_k) > MAX_DENSE_PAIRS:
            raise PatternError(f"op.mask builds a dense [n_q, n_k] bool tensor: at most {MAX_DENSE_PAIRS} pairs, got "
                               f"{n_q} x {n_q if n_k is None else n_k}",
                               hint="op.block_layout(n) classifies tiles in closed form at any length")
        if self.ir.by_heads and stage is None:
            per = [dense_mask(self.ir.stage(o).mask, n_q, n_k, runtime, device) for o in self.ir.outputs]
            reps = [self.ir.stage(o).heads[1] - self.ir.stage(o).heads[0] for o in self.ir.outputs]
            return torch.cat([m.unsqueeze(-3).expand(*m.shape[:-2], r, *m.shape[-2:])
                              for m, r in zip(per, reps)], dim=-3)
        return dense_mask(self._mask_stage(stage).mask, n_q, n_k, runtime, device)

    def block_layout(self, n_q: int, n_k: int | None = None, block: tuple[int, int] = (64, 64),
                     stage: str | None = None) -> torch.Tensor:
        """The closed-form tile classes `[ceil(n_q/BM), ceil(n_k/BN)]` int8 (0 empty, 1 partial, 2 full)."""
        from .plan.layout import block_layout
        return block_layout(self._mask_stage(stage).mask, n_q, n_q if n_k is None else n_k, *block)

    def explain(self, seq_len: int, head_dim: int = 64, device="cpu", dtype=torch.float32, batch: int = 1,
                heads: int | None = None, grad: bool = False):
        """The `Plan` for these shapes: per stage every candidate lowering with its predicted time, the chosen
        one and why, heads and mask, tiles, symbolic costs, and the N from which it beats dense attention."""
        from .plan.plan import make_plan
        return make_plan(self, seq_len=seq_len, head_dim=head_dim, device=torch.device(device), dtype=dtype,
                         batch=batch, heads=heads, grad=grad)

    def emit(self, **constexprs) -> str:
        """The Triton source generated for this program: its mask functions (`mask_tile_*`, `tile_full_*`),
        which the block-sparse kernels of `backends/triton` inline on partial tiles (full tiles skip them)."""
        from .backends.triton.codegen import emit_program
        return emit_program(self.ir, **constexprs)

    def to_flex(self, stage: str | None = None, *, n_q: int | None = None, n_k: int | None = None,
                runtime: dict | None = None, device=None):
        """A FlexAttention `mask_mod(b, h, q_idx, kv_idx)` computing the same mask as `op.mask(n_q, n_k)`;
        `random(...)` masks need the lengths, `same(...)` masks the runtime ids (`export.flex.to_flex`)."""
        from .export.flex import to_flex
        return to_flex(self, stage, n_q=n_q, n_k=n_k, runtime=runtime, device=device)

    def __repr__(self) -> str:
        return f"<AttentionOp {self.name} backend={self.backend}>\n{self.ir.to_text()}"
