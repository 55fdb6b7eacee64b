"""GPU benchmark: patterndsl's Triton backend against compiled FlexAttention and SDPA, forward and forward+backward.

    python benchmarks/gpu.py                                   # every case (H100/H200: a few minutes)
    python benchmarks/gpu.py --cases longformer-4k,bigbird-16k --json out.json --write BENCHMARKS.md
    TRITON_INTERPRET=1 python benchmarks/gpu.py --dry-run       # tiny sizes on the CPU: the script runs end to end

Flex gets an equivalent BlockMask built from patterndsl's closed-form block layout (`BlockMask.from_kv_blocks`:
partial tiles with the pattern's `mask_mod`, full tiles without), never from `create_block_mask`. Outputs are
cross-checked before anything is timed (a mismatch is reported in the row and makes the exit status 1). Times
are `triton.testing.do_bench` medians in ms (the dry run calls each method once and claims no timing). Useful
TFLOP/s count the pattern's allowed pairs only: `4 * pairs * D` per head forward and 3.5 times that forward +
backward (the backward is 2.5 forwards, as FlashAttention counts); Luna counts its two attentions, linear
attention its feature, state and output products. `% SDPA` is against dense SDPA's TFLOP/s at the same shape.
Shapes: bf16, H = 16, B * N = 64k tokens unless the case says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import patterndsl as pd  # noqa: E402
from patterndsl.export.flex import to_flex  # noqa: E402
from patterndsl.ir.dense import dense_tile  # noqa: E402
from patterndsl.plan.layout import block_layout  # noqa: E402

TOKENS, H = 65536, 16
FLEX_BLOCK = 128
BEGIN, END = "<!-- benchmarks/gpu.py: begin -->", "<!-- benchmarks/gpu.py: end -->"


@dataclass(frozen=True)
class Case:
    name: str
    pattern: str
    params: tuple = ()
    N: int = 16384
    D: int = 64
    kind: str = "softmax"          # softmax | performer | luna
    causal: bool = False


def _lf(n, **kw):
    params = dict(window=512, globals=frozenset({0}))
    params.update(kw.pop("params", {}))
    return Case(f"longformer{kw.pop('tag', '')}-{n // 1024}k", "longformer", tuple(params.items()), n, **kw)


CASES = [_lf(4096), _lf(16384), _lf(65536), _lf(16384, D=128, tag="-D128"),
         _lf(16384, params=dict(dilation=2), tag="-dilation2"),
         _lf(16384, params=dict(globals=frozenset(range(64))), tag="-64globals"),
         Case("bigbird-16k", "bigbird", (), 16384),
         Case("sliding-window-4096-16k", "sliding_window", (("window", 4096),), 16384, causal=True),
         Case("performer-256-4k", "performer", (("features", 256),), 4096, kind="performer"),
         Case("performer-256-causal-4k", "performer", (("features", 256), ("causal", True)), 4096,
              kind="performer", causal=True),
         Case("luna-16-16k", "luna", (("length", 16),), 16384, kind="luna"),
         Case("luna-256-16k", "luna", (("length", 256),), 16384, kind="luna")]


# ------------------------------------------------------------------------------------------------- counts
def allowed_pairs(mask, n: int, block: int = 128) -> int:
    """Allowed (i, j) pairs of an n x n mask: full tiles by area, partial tiles evaluated pair by pair."""
    cls = block_layout(mask, n, n, block, block)
    edge = torch.full((cls.shape[0],), block, dtype=torch.long)
    edge[-1] = n - block * (cls.shape[0] - 1)
    total = int(((cls == 2).long() * edge[:, None] * edge[None, :]).sum())
    for a, b in (cls == 1).nonzero().tolist():
        rows = torch.arange(a * block, min(n, (a + 1) * block))
        cols = torch.arange(b * block, min(n, (b + 1) * block))
        total += int(dense_tile(mask, rows, cols, (n, n), None).sum())
    return total


def flops(case: Case, B: int, N: int, D: int, op, l: int = 0) -> float:
    """Useful forward FLOPs of one call."""
    if case.kind == "luna":
        return 8.0 * l * N * D * B * H
    if case.kind == "performer":
        m = op.ir.stages[0].normaliser.feature_map.features
        return 8.0 * N * m * D * B * H
    return 4.0 * allowed_pairs(op.ir.stages[0].mask, N) * D * B * H


# ------------------------------------------------------------------------------------------------- methods
def flex_block_mask(op, n: int, device):
    """Flex's BlockMask from patterndsl's closed-form layout: partial tiles keep the mask_mod, full ones skip it."""
    from torch.nn.attention.flex_attention import BlockMask
    cls = block_layout(op.ir.stages[0].mask, n, n, FLEX_BLOCK, FLEX_BLOCK)

    def lists(which):
        sel = cls == which
        num = sel.sum(1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)   # selected first
        return num[None, None].to(device), order[None, None].contiguous().to(device)
    (kn, ki), (fn, fi) = lists(1), lists(2)
    return BlockMask.from_kv_blocks(kn, ki, fn, fi, BLOCK_SIZE=FLEX_BLOCK, mask_mod=to_flex(op, n_q=n, n_k=n,
                                                                                           device=device))


def methods(case: Case, B: int, h: int, N: int, D: int, device, dtype, dry: bool):
    """(op, {name: fn(q, k, v) -> output tensor}) for this case (the dry run shrinks features and packs)."""
    from torch.nn.attention.flex_attention import flex_attention
    params = dict(case.params)
    if dry:
        params.update({k: min(v, 32) for k, v in params.items() if k in ("features", "length")})
    op = pd.compile(case.pattern, backend="triton", **params)
    out = {}
    if case.kind == "softmax":
        block_mask = flex_block_mask(op, N, device)
        flex = flex_attention if dry else torch.compile(flex_attention, dynamic=False)
        out["patterndsl"] = lambda q, k, v: op(q, k, v)
        def run_flex(q, k, v):
            if dry:                          # Flex has no backward on the CPU, and refuses inputs needing one
                q, k, v = q.detach(), k.detach(), v.detach()
            return flex(q, k, v, block_mask=block_mask)
        run_flex.__name__ = "flex"
        out["flex"] = run_flex
    elif case.kind == "luna":
        g = torch.Generator().manual_seed(1)
        p = (torch.randn(params["length"], D, generator=g) * D ** -0.5).to(device, dtype)
        pe = p.expand(B, h, *p.shape)
        out["patterndsl"] = lambda q, k, v: op(q, k, v, p=p)[0]
        out["two SDPA"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, *(2 * (F.scaled_dot_product_attention(pe, k, v),)))
    else:
        out["patterndsl"] = lambda q, k, v: op(q, k, v)
        theirs = _performer_pytorch(op, D, device, dtype, case.causal)
        if theirs is not None:
            out["performer-pytorch"] = theirs
    out["SDPA (dense)"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    return op, out


def _performer_pytorch(op, D, device, dtype, causal):
    try:
        from performer_pytorch import FastAttention
    except ImportError:
        return None
    if causal:               # its causal path wants fast-transformers' CUDA extension, and reads the future
        return None
    st = op.ir.stages[0]
    fa = FastAttention(D, nb_features=st.normaliser.feature_map.features, causal=False)
    fa.projection_matrix.copy_(op.projection(st, D, device, torch.float32).cpu())
    fa = fa.to(device, dtype)
    return lambda q, k, v: fa(q, k, v)


# -------------------------------------------------------------------------------------------------- timing
def timed(fn, args, backward: bool, gpu: bool) -> float:
    if backward and not gpu and fn.__name__ == "flex":
        return float("nan")                  # Flex has no backward on the CPU
    grad = torch.randn_like(fn(*args)) if backward else None

    def run():
        o = fn(*args)
        if backward:
            o.backward(grad)
    if not gpu:
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(run, warmup=25, rep=100, grad_to_none=list(args) if backward else None,
                                   return_mode="median")


def check(outputs: dict, tol: float) -> str:
    """'ok' when every method's output matches patterndsl's within `tol` (relative to its largest value)."""
    ref = outputs["patterndsl"].float()
    scale = max(ref.abs().max().item(), 1e-6)
    bad = []
    for name, o in outputs.items():
        if "dense" in name or name == "patterndsl":
            continue
        err = (o.float() - ref).abs().max().item() / scale
        if not math.isfinite(err) or err > tol:
            bad.append(f"{name} differs by {err:.2g}")
    return "; ".join(bad) or "ok"


def run_case(case: Case, dry: bool, device, dtype):
    gpu = device.type == "cuda"
    N, D = (128, 16) if dry else (case.N, case.D)
    B = 1 if dry else max(1, TOKENS // N)
    h = 1 if dry else H
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    torch._dynamo.reset()                     # each case compiles its own Flex; no recompile limit carries over
    op, fns = methods(case, B, h, N, D, device, dtype, dry)
    status = check({name: fn(q, k, v).detach() for name, fn in fns.items()}, 2e-2 if case.kind == "softmax" else 6e-2)
    l = op.ir.params[0][1] if case.kind == "luna" else 0
    fl = flops(case, B, N, D, op, l) * h / H
    dense = 4.0 * N * N * D * B * h * (0.5 if case.causal else 1.0)
    rows = []
    for backward in (False, True):
        factor = 3.5 if backward else 1.0
        times = {name: timed(fn, (q, k, v), backward, gpu) for name, fn in fns.items()}
        sdpa_tflops = dense * factor / times["SDPA (dense)"] / 1e9
        tflops = {n: fl * factor / t / 1e9 for n, t in times.items()}
        tflops["SDPA (dense)"] = sdpa_tflops                # dense SDPA does (and is credited) the dense work
        rows.append(dict(case=case.name, shape=f"B{B} H{h} N{N} D{D}", pass_="fwd+bwd" if backward else "fwd",
                         check=status, times=times, tflops=tflops, sdpa_tflops=sdpa_tflops))
    return rows


# ------------------------------------------------------------------------------------------------- report
def device_name(device) -> str:
    if device.type == "cuda":
        import triton
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}"
    return "CPU (TRITON_INTERPRET=1 dry run: no timing claims)"


def markdown(rows, device: str) -> str:
    lines = [BEGIN, "## GPU: Triton backend vs FlexAttention vs SDPA (benchmarks/gpu.py)", "",
             f"Device: {device}. Median ms (`triton.testing.do_bench`); TFLOP/s count the pattern's useful work "
             f"(allowed pairs only; dense SDPA is credited its dense work); % SDPA = TFLOP/s over dense SDPA's at "
             f"the same shape. bf16, H = 16, B * N = 64k tokens.", "",
             "| case | shape | pass | method | ms | TFLOP/s | % SDPA | check |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, t in r["times"].items():
            pct = 100 * r["tflops"][name] / r["sdpa_tflops"] if r["sdpa_tflops"] else float("nan")
            lines.append(f"| {r['case']} | {r['shape']} | {r['pass_']} | {name} | {t:.3f} | {r['tflops'][name]:.1f} "
                         f"| {pct:.0f}% | {r['check']} |")
    return "\n".join(lines + ["", END])


def write_markdown(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)


def summary(rows) -> str:
    out = [f"{'case':<26} {'pass':<8} " + "  ".join(f"{n:>18}" for n in ("patterndsl", "flex/other", "SDPA dense"))]
    for r in rows:
        names = list(r["times"])
        other = next((n for n in names if n not in ("patterndsl", "SDPA (dense)")), None)
        cells = [r["times"]["patterndsl"], r["times"].get(other, float("nan")), r["times"]["SDPA (dense)"]]
        out.append(f"{r['case']:<26} {r['pass_']:<8} " + "  ".join(f"{c:>15.3f} ms" for c in cells)
                   + ("" if r["check"] == "ok" else f"   {r['check']}"))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=None, help="comma-separated case names or prefixes (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, one call per method (CPU interpreter)")
    ap.add_argument("--budget", type=float, default=None, help="seconds; skip the cases that would start later")
    ap.add_argument("--json", default=None, help="write every number here")
    ap.add_argument("--write", default=None, help="put the table into this markdown file (e.g. BENCHMARKS.md)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: run with TRITON_INTERPRET=1 --dry-run", file=sys.stderr)
        return 2
    wanted = [c for c in CASES if a.cases is None or any(c.name.startswith(x) for x in a.cases.split(","))]
    rows, t0, failed = [], time.time(), False
    for case in wanted:
        if a.budget is not None and time.time() - t0 > a.budget:
            print(f"skipped (budget): {case.name}", flush=True)
            continue
        try:
            new = run_case(case, a.dry_run or device.type == "cpu", device, torch.bfloat16)
        except Exception as e:                        # noqa: BLE001 -- one case's failure is a row, not the end
            print(f"{case.name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            failed = True
            continue
        failed |= any(r["check"] != "ok" for r in new)
        rows += new
        print(summary(new).splitlines()[-2] + "\n" + summary(new).splitlines()[-1], flush=True)
    text = markdown(rows, device_name(device))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=device_name(device), rows=rows), indent=1))
    if a.write:
        write_markdown(Path(a.write), text)
    print("\n" + summary(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
