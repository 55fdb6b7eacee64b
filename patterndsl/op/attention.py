"""`AttentionOp`: a compiled program. A call is checked once (`validate.py`), its stage graph runs on the chosen
backends (`graph.py`), and the program's outputs come back; `cache()` and `decode()` run it token by token
(`patterndsl.decode`).

>>> import torch, patterndsl as pd
>>> op = pd.compile("longformer", window=4, backend="reference")
>>> q = k = v = torch.randn(1, 2, 8, 4)
>>> op(q, k, v).shape
torch.Size([1, 2, 8, 4])
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir.program import ProgramIR
from .fast import call_key, prepare, remember
from .graph import run_graph
from .inspect import InspectionMixin
from .lowered import track
from .projections import ProjectionsMixin
from .validate import check_call, input_names

OP_OPTIONS = ("projection",)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class AttentionOp(ProjectionsMixin, InspectionMixin):
    """Call as `op(q, k, v, key_padding_mask=None, q_offset=0, **inputs)` with q `[B, H, N_q, D]`, k
    `[B, H_kv, N_k, D]`, v `[B, H_kv, N_k, D_v]` (H_kv divides H: grouped-query attention, head h reads kv head
    `h // (H / H_kv)`); `key_padding_mask` `[B, N_k]` bool, True = padding (ignored keys); `q_offset` an int or
    an integer tensor `[B]`: query row r is at absolute position `q_offset + r` (keys at 0 .. N_k - 1), where
    every mask and causal form is evaluated. `inputs` are the program's learned tensors (`p=` for Luna: `[l, D]`,
    `[H, l, D]` or `[B, H, l, D]`), runtime ids for `same(name)` masks (`name=` LongTensor `[B, N]`, or a pair
    (query ids, key ids)), and `c=` (pack keys, like k) for causal Luna. Returns one tensor
    `[B, H, N_q, D_v]`, or a tuple when the program returns several (Luna: out, packed).
    """

    def __init__(self, program, ir: ProgramIR, backend: str = "auto", projection=None):
        from ..backends import BACKEND_NAMES
        if not isinstance(backend, str):
            raise PatternError(f"backend must be a name (auto, {', '.join(BACKEND_NAMES)}), got {backend!r}")
        if backend not in BACKEND_NAMES + ("auto",):
            from ..errors import did_you_mean
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
        self._ready: dict = {}       # a checked call's key -> the callable that runs such calls (`fast.py`)
        track(self)
        from ..backends.custom import prime
        prime(st.mask for st in ir.stages)  # the custom ops' mask keys, computed before any tracing
        try:  # resolve imports now, not while torch.compile traces a call; a device it cannot use errors there
            self._stage_backends(_default_device())
        except PatternError:
            pass

    @property
    def name(self) -> str:
        return self.ir.name

    def input_names(self) -> tuple[str, ...]:
        """Keyword inputs the op accepts besides q, k, v, key_padding_mask and q_offset."""
        return input_names(self.ir)

    # ----------------------------------------------------------------------------------------------- running
    def backends(self, device: torch.device | str = "cpu") -> dict[str, str]:
        """The backend chosen for each stage on `device`."""
        device = torch.device(device)
        if device not in self._choice:
            from ..backends import declare_all
            from ..plan.select import select_backends
            declare_all()
            self._choice[device] = select_backends(self.ir, self.backend, device)
        return self._choice[device]

    def _stage_backends(self, device: torch.device) -> dict:
        """Backend objects per stage on `device` (imported once; the call path does no imports)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._resolved:
            from ..backends import get_backend
            self._resolved[device] = {n: get_backend(b) for n, b in self.backends(device).items()}
        return self._resolved[device]

    def __call__(self, q, k, v, key_padding_mask=None, q_offset=0, **inputs):
        key = None if torch.compiler.is_compiling() else call_key(q, k, v, key_padding_mask, q_offset, inputs)
        ready = self._ready.get(key) if key is not None else None
        if ready is not None:                  # checked before at these shapes (`fast.py`)
            return ready(q, k, v, key_padding_mask)
        call = check_call(self.ir, q, k, v, key_padding_mask, q_offset, inputs)
        backends = self._stage_backends(q.device)
        out = run_graph(self, call, backends)
        if key is not None:
            remember(self, key, prepare(self, q, k, v, key_padding_mask, q_offset, backends))
        return out

    # ---------------------------------------------------------------------------------------------- decoding
    def cache(self):
        """An empty `DecodeCache` for `op.decode` (docs/decoding.md): it keeps, per stage, only what later
        tokens can still use (a window's keys and the global ones, a linear stage's running sums, ...)."""
        from ..decode import DecodeCache
        return DecodeCache(self)

    def decode(self, q, k, v, cache, key_padding_mask=None, **inputs):
        """The outputs for `n` new tokens at positions `cache.length ..`: q `[B, H, n, D]`, their keys and values
        k `[B, H_kv, n, D]`, v `[B, H_kv, n, D_v]` (appended to `cache`), `key_padding_mask` `[B, n]` for them,
        `inputs` as for a call (runtime ids and pack keys of the new tokens only). Equals
        `op(q, K, V, q_offset=cache.length)` over every key so far; for a causal pattern, prefill then decode
        equals the full forward."""
        from ..decode import decode_step
        return decode_step(self, q, k, v, cache, key_padding_mask, inputs)

    def __repr__(self) -> str:
        return f"<AttentionOp {self.name} backend={self.backend}>\n{self.ir.to_text()}"
