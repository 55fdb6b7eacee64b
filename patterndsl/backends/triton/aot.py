"""Ahead-of-time compilation of the Triton kernels for a GPU on a machine without one: capture, compile, check.

`capture(workloads, arch)` runs each workload through the public path (`pd.compile(pattern, backend="triton")`,
the op's forward, then the backward of every custom op it called) on `meta` tensors that stand for a GPU of
`arch` (`target.pretend`). Triton's own launch path runs under a driver that reports that GPU, and its JIT
cache hook records each launch's specialisation (signature, constexprs, attributes, options) instead of
compiling it, so the launches are exactly the launchers' choices. The custom ops' bodies are called directly
(on meta tensors a custom op would run its fake implementation). `compile_launch` compiles one launch with
`triton.compile` for the target and reads shared memory, registers and spills (ptxas -v), the dots' lowering
(wgmma, mma.sync or FMA) and the pipelining of loads inside loops (TTGIR, PTX). Results are cached on disk,
keyed by the kernel's source hash, options, target and Triton version. `problems` says what would fail or
crawl on the GPU.

    python -m patterndsl.backends.triton.aot [--full] [--arch 90,80] [--json FILE]

Needs `TRITON_INTERPRET` unset (the interpreter replaces `triton.jit`); tests run it in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from .target import SMEM_PER_BLOCK, pretend

MAX_SPILL_BYTES = 64
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
        opts = ",".join(f"{k}={v}" for k, v in self.params)
        ext = "".join(f" {k}" for k, _ in self.extra if k == "kpm")
        return f"{self.pattern}({opts}) {self.dtype} D={self.D} N={self.N // 1024}k{ext}"


def _lf(dt, D, N, **kw):
    return Workload("longformer", (("window", 512), ("globals", frozenset({0}))), dt, D, N, **kw)


def workloads(full: bool = False) -> list[Workload]:
    """The default subset (every kernel family on a few shapes) or the full sweep of the built-ins."""
    if not full:
        return [_lf("bf16", 64, 16384), _lf("fp16", 128, 4096),
                Workload("sliding_window", (("window", 4096),), "bf16", 128, 16384),
                Workload("performer", (("features", 256), ("causal", True)), "bf16", 64, 65536),
                Workload("luna_causal", (("length", 128),), "bf16", 64, 16384, extra=(("p", 128), ("c", 1)))]
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
    return out


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
    return q, k, v, kpm, extra


def capture(items: list[Workload], arch: int) -> list[Launch]:
    """The distinct launches the forward and backward of each workload make on a GPU of `arch`."""
    import patterndsl as pd
    launches: dict = {}
    with _recording(arch, launches):
        for w in items:
            q, k, v, kpm, extra = _inputs(w)
            op = pd.compile(w.pattern, backend="triton", **dict(w.params))
            queue: list = []
            tok = _BACKWARDS.set(queue)
            try:
                _PHASE.set((w.name, "fwd"))
                op(q, k, v, key_padding_mask=kpm, **extra)
                _PHASE.set((w.name, "bwd"))
                for backward, args, out in queue:
                    backward(args, out)
            finally:
                _BACKWARDS.reset(tok)
    return list(launches.values())


# --------------------------------------------------------------------------------------------- compile
_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _cache_path(launch: Launch, arch: int) -> str:
    import triton
    from triton.compiler import ASTSource
    src = ASTSource(launch.fn, launch.signature, launch.constants, launch.attrs)
    text = json.dumps([src.hash(), launch.options, arch, triton.__version__], sort_keys=True, default=str)
    base = os.environ.get("PATTERNDSL_CACHE") or os.path.join(tempfile.gettempdir(), f"patterndsl-{os.getuid()}")
    path = os.path.join(base, "aot")
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, hashlib.sha256(text.encode()).hexdigest()[:24] + ".json")


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for `arch`; the analysis (cached on disk) or {"error": message}."""
    path = _cache_path(launch, arch)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = _compile(launch, arch)
    if "error" in result:                      # not cached: the next run tries again
        return result
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)
    return result


def _compile(launch: Launch, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.time()
    src = ASTSource(launch.fn, launch.signature, launch.constants, launch.attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log), tempfile.TemporaryDirectory() as cache:
            knobs.cache.dir = cache            # a fresh cache: ptxas runs and logs
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch.options)
    except Exception as e:                     # noqa: BLE001 -- every compiler error is a finding
        return {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    out = analyse(k.asm["ttgir"], k.asm["ptx"], log.getvalue())
    out.update(shared=k.metadata.shared, num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
               seconds=round(time.time() - t0, 1))
    return out


def _loop_bodies(ttgir: str) -> list[str]:
    """The text of every `scf.for` body (outer bodies include inner loops)."""
    lines, bodies = ttgir.splitlines(), []
    for n, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            body = []
            for nxt in lines[n + 1:]:
                if nxt.strip().startswith("}") and len(nxt) - len(nxt.lstrip()) == indent:
                    break
                body.append(nxt)
            bodies.append("\n".join(body))
    return bodies


def analyse(ttgir: str, ptx: str, ptxas_log: str) -> dict:
    """Registers and spills from the ptxas log; dots and loads from the TTGIR and PTX."""
    regs = _REGS.search(ptxas_log)
    spills = _SPILLS.search(ptxas_log)
    loops = _loop_bodies(ttgir)
    loop_text = "\n".join(loops)
    return dict(
        regs=int(regs.group(1)) if regs else -1,
        spill_stores=int(spills.group(1)) if spills else -1,
        spill_loads=int(spills.group(2)) if spills else -1,
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        loops=len(loops),
        loop_dots=len(re.findall(r"= tt\.dot(?:_scaled)? ", loop_text)) + len(
            re.findall(r"ttng\.warp_group_dot ", loop_text)),
        loop_plain_dots=len(re.findall(r"= tt\.dot(?:_scaled)? ", loop_text)),
        loop_async_copies=len(re.findall(r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy", loop_text)),
        loop_loads=len(re.findall(r"= tt\.load ", loop_text)),
        async_dot_waits=sorted({int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)}),
    )


def problems(launch: Launch, arch: int, result: dict, max_spill: int = MAX_SPILL_BYTES) -> list[str]:
    """What would fail or crawl: a compile error, shared memory over the limit, spills in fp16/bf16, and (sm_90)
    a dot inside a loop that is not wgmma."""
    if "error" in result:
        return [f"compile error: {result['error'][:300]}"]
    out = []
    if result["shared"] > SMEM_PER_BLOCK[arch]:
        out.append(f"shared memory {result['shared']} > {SMEM_PER_BLOCK[arch]} bytes")
    low = launch.dtype in ("bf16", "fp16")
    if low and max(result["spill_stores"], result["spill_loads"]) > max_spill:
        out.append(f"spills {result['spill_stores']}/{result['spill_loads']} bytes > {max_spill}")
    if arch >= 90 and low and result["loop_plain_dots"]:
        out.append(f"{result['loop_plain_dots']} dot(s) in a loop not lowered to wgmma")
    return out


# ------------------------------------------------------------------------------------------------ report
def run(items: list[Workload], archs: list[int], jobs: int = 2):
    """[(arch, launch, result, problems)] for every distinct launch of `items` on each architecture."""
    rows = []
    for arch in archs:
        launches = capture(items, arch)
        results = _map(launches, arch, jobs)
        rows += [(arch, la, res, problems(la, arch, res)) for la, res in zip(launches, results)]
    return rows


def _compile_index(arg):
    index, arch = arg
    return compile_launch(_POOL_LAUNCHES[index], arch)


_POOL_LAUNCHES: list = []


def _map(launches: list[Launch], arch: int, jobs: int) -> list[dict]:
    if jobs <= 1 or len(launches) <= 1:
        return [compile_launch(la, arch) for la in launches]
    import multiprocessing
    _POOL_LAUNCHES[:] = launches
    order = sorted(range(len(launches)), key=lambda i: -_weight(launches[i]))
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        done = dict(zip(order, pool.map(_compile_index, [(i, arch) for i in order], chunksize=1)))
    return [done[i] for i in range(len(launches))]


def _weight(launch: Launch) -> int:
    """Slow compiles first, so the pool ends together."""
    return {"luna": 4, "favor": 3}.get(launch.name.split("_")[0], 1)


def table(rows) -> str:
    head = f"{'kernel':<28} {'sm':>2} {'smem':>7} {'regs':>4} {'spill':>9} {'dot':<10} {'pipe':<4} {'grid':>6}  config"
    lines = [head, "-" * len(head)]
    for arch, la, res, bad in rows:
        grid = max((u[2] for u in la.uses), default=0)
        if "error" in res:
            lines.append(f"{la.name:<28} {arch:>2} ERROR {res['error'].splitlines()[0][:80]}  {la.describe()}")
            continue
        dot = "wgmma" if res["wgmma"] else ("mma" if res["mma_sync"] else "fma/-")
        if res["wgmma"] and res["mma_sync"]:
            dot = "wgmma+mma"
        pipe = "yes" if res["loop_async_copies"] or res["tma"] else ("no" if res["loop_loads"] else "-")
        spill = f"{res['spill_stores']}/{res['spill_loads']}"
        lines.append(f"{la.name:<28} {arch:>2} {res['shared']:>7} {res['regs']:>4} {spill:>9} {dot:<10} {pipe:<4} "
                     f"{grid:>6}  {la.describe()}{'  <-- ' + '; '.join(bad) if bad else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile patterndsl's Triton kernels for GPUs without one.")
    ap.add_argument("--full", action="store_true", help="the full sweep of built-ins (default: a subset)")
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma separated")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=None, help="write every result here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (the interpreter replaces triton.jit)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # what a launch on the GPU does today
    t0 = time.time()
    rows = run(workloads(a.full), [int(x) for x in a.arch.split(",")], a.jobs)
    print(table(rows))
    bad = [(arch, la, b) for arch, la, _, b in rows if b]
    print(f"\n{len(rows)} compiles in {time.time() - t0:.0f}s, {len(bad)} with problems")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(kernel=la.name, arch=arch, config=la.describe(), uses=la.uses, result=res, problems=b)
                       for arch, la, res, b in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
