"""Ahead-of-time compilation of the Triton kernels for a GPU on a machine without one: compile, check, report.

The launches come from `aot_capture.capture` (the launchers' own choices, through the public path), the
scored kernels (bias, tables, soft cap, near + far) included.
`compile_launch` compiles one launch with `triton.compile` for the target and reads shared memory, registers
and spills (ptxas -v), the dots' lowering (wgmma, mma.sync or FMA) and the pipelining of loads inside loops
(TTGIR, PTX). Results are cached on disk, keyed by the kernel's source hash, options, target and Triton
version. `problems` says what would fail or crawl on the GPU: a compile error, shared memory over the
target's limit, register spills in fp16/bf16 kernels, or (sm_90) a dot inside a loop that is not wgmma.

    python -m patterndsl.backends.triton.aot [--full] [--arch 90,80] [--jobs 2] [--json FILE]

exits 1 when a launch has a problem. Compiles run in `--jobs` subprocesses (each captures, then compiles its
share into the cache), so a compiler crash is reported, not fatal. Needs `TRITON_INTERPRET` unset (the
interpreter replaces `triton.jit`); the tests run it in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from .aot_capture import Launch, Workload, capture, default_plan, workloads
from .target import SMEM_PER_BLOCK

MAX_SPILL_BYTES = 64


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


def cached(launch: Launch, arch: int) -> dict | None:
    """The cached analysis of a launch, or None."""
    path = _cache_path(launch, arch)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one launch for `arch`; the analysis (cached on disk) or {"error": message}."""
    hit = cached(launch, arch)
    if hit is not None:
        return hit
    path = _cache_path(launch, arch)
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
def plan(full: bool, archs: list[int]) -> list[tuple[int, list[Workload]]]:
    """(architecture, workloads) pairs: the full sweep on every architecture, or the default subset."""
    if full:
        return [(arch, workloads(True)) for arch in archs]
    return [(arch, items) for arch, items in default_plan() if arch in archs]


def _shard(full: bool, archs: list[int], shard: int, shards: int) -> None:
    """Compile every `shards`-th launch (from `shard`) into the cache."""
    n = 0
    for arch, items in plan(full, archs):
        for la in capture(items, arch):
            if n % shards == shard:
                compile_launch(la, arch)
            n += 1


def run(full: bool, archs: list[int], jobs: int = 1):
    """[(arch, launch, result, problems)] for every distinct launch of the plan on each architecture."""
    crashed = False
    if jobs > 1:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = [sys.executable, "-m", "patterndsl.backends.triton.aot", "--arch", ",".join(map(str, archs))]
        args += ["--full"] if full else []
        procs = [subprocess.Popen(args + ["--shard", f"{k}/{jobs}"], env=env, stdout=subprocess.DEVNULL)
                 for k in range(jobs)]
        crashed = any(p.wait() != 0 for p in procs)
    rows = []
    for arch, items in plan(full, archs):
        for la in capture(items, arch):
            res = cached(la, arch)
            if res is None:
                res = {"error": "the compiler crashed (see the shard's output)"} if crashed else \
                    compile_launch(la, arch)
            rows.append((arch, la, res, problems(la, arch, res)))
    return rows


def table(rows) -> str:
    head = f"{'kernel':<26} {'sm':>2} {'smem':>7} {'regs':>4} {'spill':>9} {'dot':<9} {'pipe':<4} {'grid':>6}  config"
    lines = [head, "-" * len(head)]
    for arch, la, res, bad in rows:
        grid = max((u[2] for u in la.uses), default=0)
        if "error" in res:
            lines.append(f"{la.name:<26} {arch:>2} ERROR {res['error'].splitlines()[0][:80]}  {la.describe()}")
            continue
        dot = "wgmma" if res["wgmma"] else ("mma" if res["mma_sync"] else "fma/-")
        if res["wgmma"] and res["mma_sync"]:
            dot = "wgmma+mma"
        pipe = "yes" if res["loop_async_copies"] or res["tma"] else ("no" if res["loop_loads"] else "-")
        spill = f"{res['spill_stores']}/{res['spill_loads']}"
        lines.append(f"{la.name:<26} {arch:>2} {res['shared']:>7} {res['regs']:>4} {spill:>9} {dot:<9} {pipe:<4} "
                     f"{grid:>6}  {la.describe()}{'  <-- ' + '; '.join(bad) if bad else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile patterndsl's Triton kernels for GPUs without one.")
    ap.add_argument("--full", action="store_true", help="the full sweep of built-ins (default: a subset)")
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma separated")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling subprocesses")
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (the interpreter replaces triton.jit)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # what a launch on the GPU does today
    archs = [int(x) for x in a.arch.split(",")]
    if a.shard:
        k, n = (int(x) for x in a.shard.split("/"))
        _shard(a.full, archs, k, n)
        return 0
    t0 = time.time()
    rows = run(a.full, archs, a.jobs)
    print(table(rows))
    bad = [r for r in rows if r[3]]
    print(f"\n{len(rows)} launches compiled in {time.time() - t0:.0f}s, {len(bad)} with problems")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(kernel=la.name, arch=arch, dtype=la.dtype, config=la.describe(), uses=la.uses, result=res,
                            problems=b) for arch, la, res, b in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
