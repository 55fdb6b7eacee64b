"""CPU benchmark: patterndsl's torch backend against compiled FlexAttention, dense SDPA and the original
implementations, with peak memory, written to BENCHMARKS.md.

    python benchmarks/cpu.py                      # every case (about 20 minutes on 2 cores)
    python benchmarks/cpu.py --cases longformer --sizes 1024 4096 --no-write

Every measurement runs in a fresh subprocess. Time is the median of repeated calls after one warm-up call
(Flex compiles there). Memory is the working memory of one more call: the peak resident set during it
(sampled every 0.5 ms by a thread, kept away from the timed calls, which it would disturb) less what the
process held just before it, inputs and compiled code included, after freed memory was handed back to the
OS (`malloc_trim`). Flex's compile and block-mask build are
reported separately, in time. Outputs are checked against each other before anything is timed.
Shapes follow the issue: fp32, B = 1, H = 4, D = 64.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from patterndsl.backends.torch.softmax import BLOCK

ROOT = Path(__file__).resolve().parents[1]
B, H, D = 1, 4, 64
WINDOW = 512                    # Longformer attention_window (one-sided 256), global token 0
DENSE_MAX = 16384               # dense SDPA with an N x N bool mask: 1 GiB of mask and 4 GiB of scores at 16k
FLEX_MAX = 16384                # create_block_mask evaluates N^2 pairs: 5.5 s and ~5 GB at 16k
HF_MAX = 16384


# ------------------------------------------------------------------------------------------------- methods
def _inputs(n, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _longformer(method, n, grad):
    """(setup seconds, fn) for the Longformer case; fn runs one forward (and backward if grad)."""
    import patterndsl as pd
    op = pd.compile("longformer", window=WINDOW, globals={0}, backend="torch")
    q, k, v = _inputs(n, grad)
    t0 = time.perf_counter()
    if method == "patterndsl":
        from patterndsl.backends.torch.schedule import make_schedule
        make_schedule(op.ir.stages[0].mask, n, n, *BLOCK, B * H)          # the op's cached schedule: setup
        fn = lambda: op(q, k, v)                                            # noqa: E731
    elif method == "sdpa":
        mask = op.mask(n)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    elif method == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        from patterndsl.export import flex_block_mask
        bm = flex_block_mask(op, None, None, n)
        flex = torch.compile(flex_attention)
        fn = lambda: flex(q, k, v, block_mask=bm)                           # noqa: E731
    elif method == "hf":
        return _hf_longformer(n, grad)
    else:
        raise ValueError(method)
    return time.perf_counter() - t0, fn


def _hf_longformer(n, grad):
    """transformers' LongformerSelfAttention on (B, N, H*D) hidden states (its q/k/v projections included)."""
    import transformers
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    cfg = transformers.LongformerConfig(hidden_size=H * D, num_attention_heads=H, attention_window=[WINDOW])
    mod = LongformerSelfAttention(cfg, layer_id=0).eval()
    x = torch.randn(B, n, H * D).requires_grad_(grad)
    ext = torch.zeros(B, n)
    ext[:, 0] = 10000.0                                                    # token 0 is global
    kw = dict(attention_mask=ext, is_index_masked=ext < 0, is_index_global_attn=ext > 0, is_global_attn=True)
    return 0.0, lambda: mod(x, **kw)[0]


def _performer(method, n, grad, causal):
    import patterndsl as pd
    m = 256
    q, k, v = _inputs(n, grad)
    op = pd.compile("performer", features=m, causal=causal, backend="torch")
    w = op.projection(op.ir.stages[0], D, "cpu", torch.float32)
    if method == "patterndsl":
        return 0.0, lambda: op(q, k, v)
    if method == "performer-pytorch":
        from performer_pytorch import FastAttention
        fa = FastAttention(D, nb_features=m, causal=causal)
        fa.projection_matrix.copy_(w)
        return 0.0, lambda: fa(q, k, v)
    if method == "sdpa":
        return 0.0, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    raise ValueError(method)


def _luna(method, n, grad, length):
    import patterndsl as pd
    q, k, v = _inputs(n, grad)
    p = torch.randn(length, D, generator=torch.Generator().manual_seed(1)).requires_grad_(grad)
    if method == "patterndsl":
        op = pd.compile("luna", length=length, backend="torch")
        return 0.0, lambda: op(q, k, v, p=p)
    if method == "sdpa-pack-unpack":            # the same two attentions as two dense SDPA calls
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def two():
            packed = sdpa(p.expand(B, H, length, D), k, v)
            return sdpa(q, packed, packed), packed
        return 0.0, two
    if method == "sdpa-full":                   # what Luna replaces: full softmax attention
        return 0.0, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    raise ValueError(method)


def _make(case, method, n, grad):
    if case == "longformer":
        return _longformer(method, n, grad)
    if case.startswith("performer"):
        return _performer(method, n, grad, causal=case.endswith("causal"))
    if case.startswith("luna"):
        return _luna(method, n, grad, int(case.split("-")[1]))
    raise ValueError(case)


# -------------------------------------------------------------------------------------------- one run
def _run_once(fn, grad):
    out = fn()
    if grad:
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().square().mean() for o in outs).backward()
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident set size seen while the block runs (a sampling thread)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _release_free_memory():
    """Hand memory freed by earlier calls back to the OS (glibc keeps it resident), so the next call's
    peak is measured from what is live, not hidden in pages the allocator still holds."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(case, method, n, mode, repeat):
    """Time (median ms), setup/compile seconds and peak working memory (MB) of one method, in this process."""
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    setup, fn = _make(case, method, n, grad)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        t0 = time.perf_counter()
        _run_once(fn, grad)                                                   # warm-up (Flex compiles here)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            _run_once(fn, grad)
            times.append(time.perf_counter() - t0)
        _release_free_memory()
        with PeakRSS() as mem:            # apart from the timed calls: the sampler would steal a core
            _run_once(fn, grad)
    ms = statistics.median(times) * 1e3
    peak = (mem.peak - mem.base) / 2 ** 20
    return {"case": case, "method": method, "n": n, "mode": mode, "ms": ms, "setup_s": setup,
            "compile_s": max(0.0, first - ms / 1e3) if method == "flex" else None, "peak_mb": peak}


def _agree(case, n):
    """The methods' outputs agree at this size (fp32, forward): the benchmark compares equal work."""
    outs = {}
    for method in METHODS[case]:
        if _skip(case, method, n):
            continue
        with torch.no_grad():
            out = _make(case, method, n, False)[1]()
        outs[method] = out[0] if isinstance(out, tuple) else out
    ref = outs.pop("patterndsl")
    for method, out in outs.items():
        if method in ("hf", "sdpa-full") or case.startswith("performer") and method == "sdpa":
            continue                                     # different projections / a different function
        out = out.reshape(ref.shape)
        if case == "performer-causal":                   # performer-pytorch stabilises keys by the max over
            out, ref = out[:, :, -1], ref[:, :, -1]      # all keys (it leaks the future): last rows agree
        err = (out - ref).abs().max().item()
        if err > 2e-3:
            raise SystemExit(f"{case} N={n}: {method} differs from patterndsl by {err:.3g}")


METHODS = {
    "longformer": ("patterndsl", "flex", "sdpa", "hf"),
    "performer": ("patterndsl", "performer-pytorch", "sdpa"),
    "performer-causal": ("patterndsl", "performer-pytorch", "sdpa"),
    "luna-16": ("patterndsl", "sdpa-pack-unpack", "sdpa-full"),
    "luna-256": ("patterndsl", "sdpa-pack-unpack", "sdpa-full"),
}
SIZES = {"longformer": (1024, 4096, 16384, 65536), "performer": (4096, 16384), "performer-causal": (4096, 16384),
         "luna-16": (4096, 16384), "luna-256": (4096, 16384)}


def _skip(case, method, n) -> str | None:
    if method in ("sdpa", "sdpa-full") and n > DENSE_MAX:
        return f"dense N x N above {DENSE_MAX}"
    if method == "flex" and n > FLEX_MAX:
        return f"block-mask build evaluates N^2 pairs above {FLEX_MAX}"
    if method == "hf" and n > HF_MAX:
        return "not run above 16k"
    return None


# --------------------------------------------------------------------------------------------- driver
def _child(case, method, n, mode, repeat):
    cmd = [sys.executable, __file__, "--one", json.dumps([case, method, n, mode, repeat])]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        return {"case": case, "method": method, "n": n, "mode": mode, "error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def layout_timing() -> list[str]:
    """Closed-form layout and schedule build times at large N (no N^2 work anywhere)."""
    import patterndsl as pd
    from patterndsl.backends.torch.schedule import make_schedule
    from patterndsl.plan.layout import tile_layout
    mask = pd.compile("longformer", window=WINDOW, globals={0}).ir.stages[0].mask
    rows = []
    for n in (1 << 16, 1 << 20):
        tile_layout(mask, 4096, 4096)                                         # warm-up
        t0 = time.perf_counter()
        lay = tile_layout(mask, n, n, *BLOCK)
        t_layout = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        sched = make_schedule(mask, n, n, *BLOCK, B * H)
        t_sched = (time.perf_counter() - t0) * 1e3
        rows.append(f"| {n:,} | {lay.nnz:,} | {t_layout:.0f} ms | {len(sched.chunks)} | {t_sched:.0f} ms |")
    return rows


def _fmt(r):
    if r is None or "skip" in r:
        return "-"
    if "does not support backward" in r.get("error", ""):
        return "no CPU backward"
    if "error" in r:
        return "error: " + r["error"][:60]
    extra = f" (+{r['compile_s']:.1f} s compile, {r['setup_s']:.1f} s block mask)" if r.get("compile_s") is not None \
        else ""
    return f"{r['ms']:.1f} ms / {r['peak_mb']:.0f} MB{extra}"


def table(results, case) -> list[str]:
    methods = METHODS[case]
    lines = ["| N | mode | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    by = {(r["n"], r["mode"], r["method"]): r for r in results if r["case"] == case}
    for n in sorted({k[0] for k in by}):
        for mode in ("fwd", "fwd+bwd"):
            cells = [_fmt(by.get((n, mode, m))) for m in methods]
            lines.append(f"| {n:,} | {mode} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--sizes", nargs="+", type=int, default=None, help="override the N of every case")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return 0
    results = []
    for case in args.cases:
        for n in args.sizes or SIZES[case]:
            _agree(case, min(n, 4096))
            for mode in args.modes:
                for method in METHODS[case]:
                    why = _skip(case, method, n)
                    if why:
                        results.append({"case": case, "n": n, "mode": mode, "method": method, "skip": why})
                        continue
                    repeat = 5 if n <= 4096 else 3 if n <= 16384 else 2
                    r = _child(case, method, n, mode, repeat)
                    results.append(r)
                    print(f"{case:<17} N={n:<6} {mode:<8} {method:<18} {_fmt(r)}", flush=True)
    skipped = sorted({(r["method"], r["skip"]) for r in results if "skip" in r})
    lines = _report(args, results, skipped)
    print("\n".join(lines))
    if not args.no_write:
        _write(lines)
    return 0


def _report(args, results, skipped) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    command = " ".join(["python benchmarks/cpu.py"] + sys.argv[1:])
    head = [f"Command: `{command}`  ",
            f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}; date {datetime.date.today()}  ",
            f"Shapes: fp32, B = {B}, H = {H}, D = {D}. Cells: median time / peak memory growth (RSS).", ""]
    out = head
    for case in args.cases:
        out += [f"**{case}**", ""] + table(results, case) + [""]
    if skipped:
        out += ["Not run: " + "; ".join(f"{m} ({why})" for m, why in skipped) + ".", ""]
    if "longformer" in args.cases:
        out += [f"Closed-form layout and schedule of the Longformer mask ({BLOCK[0]} x {BLOCK[1]} tiles, B*H = 4):",
                "",
                "| N | nonempty tiles | layout | schedule chunks | schedule |", "|---|---|---|---|---|"]
        out += layout_timing() + [""]
    return out


def _write(lines):
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    begin, end = "<!-- cpu:begin -->", "<!-- cpu:end -->"
    block = "\n".join([begin, "## CPU (torch backend)", ""] + lines + [end])
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
