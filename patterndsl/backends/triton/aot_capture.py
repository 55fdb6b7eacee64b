"""Capture, for ahead-of-time compilation, the kernel launches the Triton backend makes for real workloads.

`capture(workloads, arch)` runs each workload through the public path (`pd.compile(pattern, backend="triton")`,
the op's forward, then the backward of every custom op it called) on `meta` tensors that stand for a GPU of
`arch` (`target.pretend`). Triton's own launch path runs under a driver that reports that GPU, and its JIT
cache hook records each launch's specialisation (signature, constexprs, attributes, options) instead of
compiling it, so the launches are exactly the launchers' choices. The custom ops' bodies are called directly
(on meta tensors a custom op would run its fake implementation). Needs `TRITON_INTERPRET` unset.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass, field

import torch

from .target import pretend

H = 16


@dataclass(frozen=True)
class Workload:
    """One call of a built-in (or pattern text) at one shape: `[B, H, N, D]` q, k, v of `dtype`."""
    pattern: str
    params: tuple = ()
    dtype: str = "bf16"
    D: int = 64
    N: int = 16384
    B: int = 1
    extra: tuple = ()          # ("p", l): packed queries [l, D]; ("c", 1): pack keys like k; ("kpm", 1)

    @property
    def name(self) -> str:
        pattern = self.pattern.split("(")[0].replace("pattern ", "")
        opts = ",".join(f"{k}={v}" for k, v in self.params)
        ext = "".join(f" {k}" for k, _ in self.extra if k == "kpm")
        return f"{pattern}({opts}) {self.dtype} D={self.D} N={self.N // 1024}k{ext}"


def _lf(dt, D, N, **kw):
    return Workload("longformer", (("window", 512), ("globals", frozenset({0}))), dt, D, N, **kw)


def default_plan() -> list[tuple[int, list[Workload]]]:
    """The subset CI compiles by default: every kernel family on Hopper at one or two shapes, and on Ampere the
    configurations that differ there (dk/dv options, causal Luna's shared memory at l = 128)."""
    luna = Workload("luna_causal", (("length", 128),), "bf16", 64, 16384, extra=(("p", 128), ("c", 1)))
    return [(90, [_lf("bf16", 64, 16384), Workload("sliding_window", (("window", 4096),), "bf16", 128, 16384),
                  Workload("performer", (("features", 256), ("causal", True)), "bf16", 64, 65536), luna,
                  *scored_workloads(full=False)]),
            (80, [_lf("fp16", 128, 4096), luna])]


ALIBI = """pattern alibi(heads: int = 16, causal: bool = true) {
    attend softmax, causal = causal, bias = -alibi_slope(h, heads) * abs(i - j)
}"""
T5 = """pattern t5_bias(heads: int = 16, buckets: int = 32, max_distance: int = 128, bidirectional: bool = true) {
    param rel[heads, buckets]
    attend softmax, causal = not bidirectional, scale = 1.0, bias = t5_bias(rel, buckets, max_distance, bidirectional)
}"""
GEMMA2 = """pattern gemma2(local: bool = true, window: int = 4096, cap: float = 50.0, scale: float = 0.0625) {
    attend softmax over if local then window(window - 1, 0) else causal, causal = true, scale = scale, softcap = cap
}"""


def scored_workloads(full: bool = True) -> list[Workload]:
    """Softmax stages with score terms (examples/alibi, t5_bias, gemma2; the built-in window_favor) at 4k. The
    default subset keeps one launch of each kind: a table gradient (t5_bias), a cap at D = 128 (gemma2) and the
    near field's kernels at m = 256, D = 128 (window_favor)."""
    out = [Workload(T5, (), "bf16", 64, 4096, extra=(("table:rel", 32),)),
           Workload(GEMMA2, (("window", 1024),), "bf16", 128, 4096),
           Workload("window_favor", (("window", 512), ("features", 256), ("causal", False)), "bf16", 128, 4096)]
    if full:
        out += [Workload(ALIBI, (), "bf16", 64, 4096),
                Workload("window_favor", (("window", 128), ("features", 64)), "bf16", 64, 4096)]
    return out


def workloads(full: bool = True) -> list[Workload]:
    """The full sweep of the built-ins (bf16 and fp16, D = 64 and 128, N = 4k..64k), or the default subset's."""
    if not full:
        return list(dict.fromkeys(w for _, items in default_plan() for w in items))
    out = []
    for dt in ("bf16", "fp16"):
        for D in (64, 128):
            out += [_lf(dt, D, N) for N in (4096, 16384, 65536)]
            out += [Workload("bigbird", (), dt, D, 4096),
                    Workload("dilated_window", (("window", 512), ("dilation", 2)), dt, D, 16384),
                    Workload("sliding_window", (("window", 4096),), dt, D, 16384)]
            for causal in (False, True):
                out += [Workload("performer", (("features", 256), ("causal", causal)), dt, D, N) for N in (4096, 65536)]
                out.append(Workload("performer", (("features", 256), ("kernel", "relu"), ("causal", causal)), dt, D,
                                    16384))
                out.append(Workload(ELU1 if not causal else ELU1_CAUSAL, (), dt, D, 16384))
            for length in (16, 32, 64, 128):
                out.append(Workload("luna_causal", (("length", length),), dt, D, 16384,
                                    extra=(("p", length), ("c", 1))))
            for length in (16, 128):
                out.append(Workload("luna", (("length", length),), dt, D, 16384, extra=(("p", length),)))
    out.append(_lf("bf16", 64, 4096, extra=(("kpm", 1),)))
    return out + scored_workloads()


ELU1 = "pattern elu_linear() { attend linear(elu1) }"
ELU1_CAUSAL = "pattern elu_linear_causal() { attend linear(elu1), causal = true }"


# --------------------------------------------------------------------------------------------- capture
@dataclass
class Launch:
    """One kernel launch as Triton's JIT specialised it, and the workloads that made it."""
    fn: object
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    uses: list = field(default_factory=list)       # (workload name, phase, programs in the grid)

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def dtype(self) -> str:
        types = [t[1:] for t in self.signature.values() if isinstance(t, str) and t.startswith("*")]
        return next((t for t in types if t in ("bf16", "fp16", "fp32", "fp64")), "?")

    def describe(self) -> str:
        names = self.fn.arg_names
        parts = [self.dtype, f"w{self.options.get('num_warps')}/s{self.options.get('num_stages')}"]
        for (i,), v in sorted(self.constants.items()):
            if names[i].isupper() and not callable(v) and v is not None:
                parts.append(f"{names[i]}={int(v) if isinstance(v, bool) else v}")
        return " ".join(parts)


class _Driver:
    """A Triton driver that reports a GPU of one architecture and runs nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return ("aot", self.target.arch)      # one JIT binder per architecture

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


_PHASE = contextvars.ContextVar("aot_phase", default=("", ""))
_GRID = contextvars.ContextVar("aot_grid", default=())


@contextlib.contextmanager
def _recording(arch: int, launches: dict):
    """Launches under this block are recorded into `launches` (keyed by kernel and specialisation)."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        opts = {k: _tuples(v) for k, v in json.loads(compile["specialization_data"])["options"].items()}
        jit = fn.jit_function
        k = (jit.__name__, repr, str(compile["constants"]))
        rec = launches.setdefault(k, Launch(jit, dict(compile["signature"]), dict(compile["constants"]),
                                            dict(compile["configs"][0]), opts))
        grid = _GRID.get()
        rec.uses.append((*_PHASE.get(), _programs(grid)))
        return True                            # skip compiling: nothing is launched

    getitem = JITFunction.__getitem__

    def with_grid(self, grid):
        run = getitem(self, grid)

        def launch(*args, **kwargs):
            _GRID.set(grid)
            return run(*args, **kwargs)
        return launch

    old_hook, old_driver = knobs.runtime.jit_cache_hook, getattr(driver, "_active", None)
    driver.set_active(_Driver(arch))
    knobs.runtime.jit_cache_hook = hook
    JITFunction.__getitem__ = with_grid
    try:
        with pretend(arch), _custom_ops_inline():
            yield
    finally:
        JITFunction.__getitem__ = getitem
        knobs.runtime.jit_cache_hook = old_hook
        driver.set_active(old_driver)          # reset_active() would look for a GPU


def _tuples(x):
    """JSON lists back to the tuples Triton's options hold."""
    return tuple(_tuples(y) for y in x) if isinstance(x, list) else x


def _programs(grid) -> int:
    n = 1
    for g in grid:
        n *= int(g)
    return n


_BACKWARDS: contextvars.ContextVar[list | None] = contextvars.ContextVar("aot_backwards", default=None)


@contextlib.contextmanager
def _custom_ops_inline():
    """Call the custom ops' bodies directly and queue their backward bodies (meta tensors would otherwise run
    the fake implementations); let the Triton backend accept meta tensors."""
    from . import BACKEND, favor, luna, softmax
    swaps = [(softmax, "_softmax_op", softmax.forward_body, _softmax_backward),
             (favor, "_linear_op", favor.forward_body, _linear_backward),
             (luna, "_luna_op", luna.forward_body, _luna_backward)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _, _ in swaps]
    for mod, name, body, backward in swaps:
        setattr(mod, name, _inline(body, backward))
    supports = type(BACKEND).supports
    type(BACKEND).supports = lambda self, stage, device: supports(
        self, stage, "cuda" if torch.device(device).type == "meta" else device)
    try:
        yield
    finally:
        type(BACKEND).supports = supports
        for mod, name, op in saved:
            setattr(mod, name, op)


def _inline(body, backward):
    def call(*args):
        out = body(*args)
        queue = _BACKWARDS.get()
        if queue is not None:
            queue.append((backward, args, out))
        return out
    return call


def _softmax_backward(args, out):
    from . import softmax
    q, k, v, kpm, ids, key, scale, q_offset = args
    o, lse = out
    softmax.backward_body(torch.empty_like(o), None, q, k, v, o, lse, kpm, ids, key, scale, q_offset)


def _linear_backward(args, out):
    from . import favor
    q, k, v, w, kpm, kind, causal, eps, q_offset, segment = args
    o, den = out
    favor.backward_body(torch.empty_like(o), q, k, v, w, kpm, o, den, kind, causal, eps, q_offset, segment)


def _luna_backward(args, out):
    from . import luna
    q, k, v, p, c, kpm = args
    luna.backward_body(torch.empty_like(out), q, k, v, p, c, kpm)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(w: Workload):
    meta = dict(device="meta", dtype=_DTYPES[w.dtype])
    q, k, v = (torch.empty(w.B, H, w.N, w.D, **meta) for _ in range(3))
    extra, kpm = {}, None
    for name, value in w.extra:
        if name == "p":
            extra["p"] = torch.empty(value, w.D, **meta)
        elif name == "c":
            extra["c"] = torch.empty(w.B, H, w.N, w.D, **meta)
        elif name == "kpm":
            kpm = torch.zeros(w.B, w.N, dtype=torch.bool, device="meta")
        elif name.startswith("table:"):                      # a bias table [H, width]
            extra[name[6:]] = torch.empty(H, value, **meta)
    return q, k, v, kpm, extra


def capture(items: list[Workload], arch: int) -> list[Launch]:
    """The distinct launches the forward and backward of each workload make on a GPU of `arch`."""
    import patterndsl as pd
    launches: dict = {}
    with _recording(arch, launches):
        for w in items:
            q, k, v, kpm, extra = _inputs(w)
            op = pd.compile(w.pattern, backend="triton", **dict(w.params))
            scored = any(st.score is not None for st in op.ir.stages)     # autograd functions, not custom ops
            leaves = [x.requires_grad_() for x in (q, k, v, *extra.values())] if scored else []
            queue: list = []
            tok = _BACKWARDS.set(queue)
            try:
                _PHASE.set((w.name, "fwd"))
                out = op(q, k, v, key_padding_mask=kpm, **extra)
                _PHASE.set((w.name, "bwd"))
                for backward, args, out_ in queue:
                    backward(args, out_)
                if leaves:
                    torch.autograd.grad(out, leaves, torch.empty_like(out), allow_unused=True)
            finally:
                _BACKWARDS.reset(tok)
    return list(launches.values())
