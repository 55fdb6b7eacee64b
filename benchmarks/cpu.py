"""CPU benchmark of the planner's choices (issue 11's targets), written to BENCHMARKS.md.

    python benchmarks/cpu.py                                  # everything (about 20 minutes on 2 cores)
    python benchmarks/cpu.py --patterns longformer --sizes 1024 4096 --no-write

Every cell runs in a fresh subprocess that builds each method, checks their outputs agree, warms each up once
(Flex compiles there), then times them interleaved (one call of each in turn, `repeat` rounds), so a busy
machine slows them alike: ratios are the numbers to read. Shapes: fp32, B = 1, H = 4, D = 64.

- softmax built-ins at N = 256 .. 16k: `auto` forward against SDPA with the bool mask and compiled Flex
  (its BlockMask from the closed-form layout, as patterndsl builds it; compile time reported apart), and
  forward+backward against SDPA (Flex has no CPU backward);
- causal Performer (m = 256) forward+backward against dense causal SDPA; causal Luna forward against it;
- `patterndsl demo` at its default size; the plan of a 1M-token Longformer; a first call against a warm one.
The cost constants are calibrated once at the start (`patterndsl calibrate`), as a user's first call would.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                  # this checkout's patterndsl, not an installed one
B, H, D = 1, 4, 64
PATTERNS = ("longformer", "bigbird", "sliding_window", "sparse_transformer", "dilated_window", "prefix_lm")
SIZES = (256, 1024, 4096, 16384)


# ----------------------------------------------------------------------------------------------- methods
def _inputs(n, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _softmax_methods(pattern, n, grad):
    """{name: fn} for one softmax cell, and the compile seconds of Flex (None when not run)."""
    import patterndsl as pd
    from patterndsl.backends.torch.flex import block_mask
    op = pd.compile(pattern)
    q, k, v = _inputs(n, grad)
    mask = op.mask(n)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    methods = {"auto": lambda: op(q, k, v), "sdpa": lambda: sdpa(q, k, v, attn_mask=mask)}
    compile_s = None
    if not grad:
        from torch.nn.attention.flex_attention import flex_attention
        bm = block_mask(op.ir.stages[0].mask, n, n, q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        flex(q, k, v, block_mask=bm)
        compile_s = time.perf_counter() - t0
        methods["flex"] = lambda: flex(q, k, v, block_mask=bm)
    return op, methods, compile_s


def _linear_methods(case, n, grad):
    import patterndsl as pd
    q, k, v = _inputs(n, grad)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    if case == "performer-causal":
        op = pd.compile("performer", features=256, causal=True)
        return op, {"auto": lambda: op(q, k, v), "sdpa": sdpa}, None
    op = pd.compile("luna_causal", length=16)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(16, D, generator=g).requires_grad_(grad)
    c = torch.randn(B, H, n, D, generator=g).requires_grad_(grad)
    return op, {"auto": lambda: op(q, k, v, p=p, c=c), "sdpa": sdpa}, None


def _run(fn, grad):
    out = fn()
    if grad:
        out.float().square().mean().backward()
    return out


def measure(case, n, mode, repeat):
    """One cell, in this process: medians (ms) of the methods timed interleaved, the lowering auto chose."""
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    make = _softmax_methods if case in PATTERNS else _linear_methods
    op, methods, compile_s = make(case, n, grad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        outs = {name: _run(fn, False) for name, fn in methods.items()}
        ref = outs["auto"].detach()
        agree = {name: float((o.detach() - ref).abs().max()) for name, o in outs.items() if name != "auto"}
        if case in PATTERNS and max(agree.values()) > 2e-3:
            raise SystemExit(f"{case} N={n}: outputs differ {agree}")
        times = {name: [] for name in methods}
        for _ in range(repeat):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                _run(fn, grad)
                times[name].append(time.perf_counter() - t0)
    chosen = sorted(set(op._lowered.values()))
    return {"case": case, "n": n, "mode": mode, "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "compile_s": compile_s, "lowering": ", ".join(chosen)}


# -------------------------------------------------------------------------------------------- other rows
def plan_timing(n=1 << 20):
    """Seconds to plan a 1M-token Longformer: the choice (every candidate's work, from closed-form layouts)
    and the chosen lowering's own setup, in a process that has not seen this N."""
    import patterndsl as pd
    from patterndsl.plan.lowering import Problem
    from patterndsl.plan.select import choose
    st = pd.compile("longformer").ir.stages[0]
    t0 = time.perf_counter()
    choice = choose(Problem(st, B, H, n, n, D, D))
    t_choose = time.perf_counter() - t0
    t0 = time.perf_counter()
    from patterndsl.backends.torch.schedule import make_schedule
    make_schedule(st.mask, n, n, 64, 64, B * H)
    t_sched = time.perf_counter() - t0
    return {"choose_s": t_choose, "chosen": choice.chosen.name, "blocksparse_schedule_s": t_sched}


def first_call(n=16384):
    """A first call at 16k (choice, layouts, masks: everything but calibration, which is cached) vs warm."""
    import patterndsl as pd
    op = pd.compile("longformer")
    q, k, v = _inputs(n, False)
    with torch.no_grad():
        t0 = time.perf_counter()
        op(q, k, v)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            op(q, k, v)
            warm.append(time.perf_counter() - t0)
    return {"first_s": first, "warm_s": statistics.median(warm), "lowering": ", ".join(op._lowered.values())}


def demo_check():
    res = subprocess.run([sys.executable, "-m", "patterndsl.cli", "demo", "--no-pictures"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith(("ok", "FAIL"))]
    ratios = {}
    for ln in rows:
        m = re.match(r"(ok|FAIL)\s+(\S+).*\(\s*([\d.]+)x\)", ln)
        if m:
            ratios[m.group(2)] = float(m.group(3))
    return {"lines": rows, "ratios": ratios}


# ------------------------------------------------------------------------------------------------ driver
def _child(kind, args):
    cmd = [sys.executable, __file__, "--one", json.dumps([kind, args])]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _one(payload):
    kind, args = json.loads(payload)
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"cell": lambda: measure(*args), "plan": plan_timing, "first": first_call}[kind]()
    print(json.dumps(out))


def _repeat(n):
    """Rounds per cell: a call at N = 256 takes ~1 ms, where a handful of rounds on a shared machine is noise."""
    return 200 if n <= 256 else 30 if n <= 1024 else 5 if n <= 4096 else 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["linear", "demo", "plan", "first"])
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        _one(args.one)
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    from patterndsl.backends import declare_all
    from patterndsl.plan.calibrate import calibrate
    declare_all()
    consts = calibrate("cpu")
    print(consts.source, flush=True)
    cells = []
    for mode in args.modes:
        for pattern in args.patterns:
            for n in args.sizes:
                r = _child("cell", [pattern, n, mode, _repeat(n)])
                r.setdefault("case", pattern), r.setdefault("n", n), r.setdefault("mode", mode)
                cells.append(r)
                print(json.dumps(r), flush=True)
    if "linear" not in args.skip:
        for case, mode in (("performer-causal", "fwd+bwd"), ("luna-causal", "fwd")):
            for n in (4096, 16384):
                cells.append({**_child("cell", [case, n, mode, 3]), "case": case, "n": n, "mode": mode})
                print(json.dumps(cells[-1]), flush=True)
    extra = {k: (_child(k, []) if k not in args.skip else None) for k in ("plan", "first")}
    extra["demo"] = demo_check() if "demo" not in args.skip else None
    fits = ", ".join(f"{k[4:]} {v:.2f}" for k, v in consts.as_dict().items() if k.startswith("fit."))
    lines = report(cells, extra, consts.source + (f"; fit factors (measured / predicted): {fits}" if fits else ""))
    print("\n".join(lines))
    if not args.no_write:
        write(lines)
    return 0


# ------------------------------------------------------------------------------------------------ report
def _ratio(r, names):
    ms = r.get("ms", {})
    others = [ms[n] for n in names if n in ms]
    return ms["auto"] / min(others) if "auto" in ms and others else None


def _softmax_table(cells, mode):
    head = ("| pattern | N | auto | SDPA + mask | compiled Flex | auto / min | auto's lowering |" if mode == "fwd"
            else "| pattern | N | auto | SDPA + mask | auto / SDPA | auto's lowering |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in cells:
        if r["mode"] != mode or r["case"] not in PATTERNS:
            continue
        if "error" in r:
            out.append(f"| {r['case']} | {r['n']:,} | error: {r['error'][:80]} |")
            continue
        ms = r["ms"]
        if mode == "fwd":
            flex = f"{ms['flex']:.1f} (+{r['compile_s']:.1f} s compile)" if "flex" in ms else "-"
            out.append(f"| {r['case']} | {r['n']:,} | {ms['auto']:.1f} | {ms['sdpa']:.1f} | {flex} | "
                       f"{_ratio(r, ('sdpa', 'flex')):.2f} | {r['lowering']} |")
        else:
            out.append(f"| {r['case']} | {r['n']:,} | {ms['auto']:.1f} | {ms['sdpa']:.1f} | "
                       f"{_ratio(r, ('sdpa',)):.2f} | {r['lowering']} |")
    return out


def report(cells, extra, source) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    out = [f"Command: `{' '.join(['python benchmarks/cpu.py'] + sys.argv[1:])}`  ",
           f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; date {datetime.date.today()}  ",
           f"Shapes: fp32, B = {B}, H = {H}, D = {D}; milliseconds, medians of calls interleaved in one process.  ",
           f"Cost constants: {source}", "", "**Softmax built-ins, forward** (target: auto / min <= 1.05)", ""]
    out += _softmax_table(cells, "fwd") + ["", "**Softmax built-ins, forward+backward** (target: auto / SDPA <= 1.0)",
                                           ""] + _softmax_table(cells, "fwd+bwd")
    lin = [r for r in cells if r["case"] in ("performer-causal", "luna-causal")]
    if lin:
        out += ["", "**Causal linear and nested** (against dense causal SDPA)", "",
                "| case | N | mode | auto | dense causal SDPA | dense / auto | auto's lowering |", "|---|---|---|---|---|---|---|"]
        for r in lin:
            if "error" in r:
                out.append(f"| {r['case']} | {r['n']:,} | {r['mode']} | error: {r['error'][:80]} |")
                continue
            ms = r["ms"]
            out.append(f"| {r['case']} | {r['n']:,} | {r['mode']} | {ms['auto']:.1f} | {ms['sdpa']:.1f} | "
                       f"{ms['sdpa'] / ms['auto']:.2f} | {r['lowering']} |")
    out += _extras(extra)
    return out


def _extras(extra) -> list[str]:
    out = []
    plan, first, demo = extra.get("plan"), extra.get("first"), extra.get("demo")
    if plan and "error" not in plan:
        out += ["", f"**1M-token Longformer plan**: the choice (every candidate's work from closed-form layouts) "
                    f"{plan['choose_s'] * 1e3:.0f} ms, chose {plan['chosen']}; the block-sparse schedule alone "
                    f"{plan['blocksparse_schedule_s'] * 1e3:.0f} ms (64x64 tiles)."]
    if first and "error" not in first:
        out += ["", f"**First call at 16k** (Longformer, calibration cached): {first['first_s'] * 1e3:.0f} ms vs "
                    f"{first['warm_s'] * 1e3:.0f} ms warm ({first['lowering']})."]
    if demo:
        slower = [k for k, r in demo["ratios"].items() if r < 1.0]
        out += ["", "**`patterndsl demo`** (N = 1024; speed-up over dense SDPA with the mask): "
                + ", ".join(f"{k} {r:.2f}x" for k, r in demo["ratios"].items())
                + (f"; slower than dense: {', '.join(slower)}" if slower else "; none slower than dense")]
    return out


def write(lines):
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- cpu:begin -->", "<!-- cpu:end -->"
    block = "\n".join([begin, "## CPU (planner: auto against SDPA and Flex)", ""] + lines + [end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
