"""The work each torch lowering does on a problem, in the cost model's terms (`plan/model.py`).

These are counts, not times: score elements each kernel computes (whole tiles and windows, not just the
allowed pairs), the elements that read a mask, bytes copied or gathered, and calls. The constants that turn
them into seconds are calibrated on the machine (`probes.py`).

>>> import patterndsl as pd
>>> from patterndsl.plan.lowering import Problem
>>> st = pd.compile("longformer", window=512).ir.stages[0]
>>> w = pieces_work(Problem(st, 1, 4, 16384, 16384, 64, 64), 256)
>>> w.term("flash.64") / (4 * 16384)           # key columns per row: windows of three 256-row blocks
768.0
"""
from __future__ import annotations

import functools
import math

import torch

from ...ir import mask as M
from ...plan.decompose import decompose, effective, in_classes
from ...plan.layout import PARTIAL, tile_layout
from ...plan.lowering import Problem, Work
from .band import Window, geometry
from .flash import q_split
from .schedule import BUDGET

KV_SPLIT = 512          # the flash kernel's key block


def elt(p: Problem) -> int:
    """Bytes per element as the kernels compute (fp16/bf16 run in float32)."""
    return 8 if p.dtype == torch.float64 else 4


def flash(counts: dict, elems: float, rows: int, masked: bool, grad: bool) -> None:
    """Add a flash-kernel call's score elements (its per-item row split from `rows` per (batch, head))."""
    qs = q_split(rows)
    counts[f"flash.{qs}"] = counts.get(f"flash.{qs}", 0.0) + elems
    if masked:
        counts["flash.mask"] = counts.get("flash.mask", 0.0) + elems
    if grad:
        counts[f"flash.bwd.{qs}"] = counts.get(f"flash.bwd.{qs}", 0.0) + elems
        if masked:
            counts["flash.bwd.mask"] = counts.get("flash.bwd.mask", 0.0) + elems
    counts["call"] = counts.get("call", 0.0) + (2 if grad else 1)


def causal_elems(n_q: int, n_k: int) -> float:
    """Score elements the kernel computes for top-left causal rows (whole key blocks up to the diagonal)."""
    qs = q_split(n_q)
    total = 0.0
    for m in range(0, n_q, qs):
        rows = min(qs, n_q - m)
        keys = min(m + rows, n_k)
        total += rows * min(n_k, -(-keys // KV_SPLIT) * KV_SPLIT)
    return total


def _add(counts, key, amount):
    counts[key] = counts.get(key, 0.0) + amount


# --------------------------------------------------------------------------------------------- pieces
def pieces_work(p: Problem, bm: int) -> Work:
    d = decompose(p.stage.mask)
    counts: dict = {}
    e, D, g = elt(p), p.head_dim, p.grad
    for band in d.bands:
        s, o = band.step, p.q_offset
        nq, nk, bh = -(-(o % s + p.n_q) // s), -(-p.n_k // s), p.bh * s
        cb = effective(in_classes(band, o // s), nq, nk)
        ragged = p.padded or nq * s != p.n_q or nk * s != p.n_k
        if s > 1:      # permuting q, k, v, out (and dout, the grads) in and out of residue classes
            _add(counts, "byte", bh * (2 * nq + 2 * nk) * D * e * (2.5 if g else 1))
        if isinstance(cb, M.Full):
            flash(counts, bh * nq * nk, nq, ragged, g)
        elif cb.hi is None:
            flash(counts, bh * causal_elems(max(nq - cb.lo, 0), nk), nq - min(cb.lo, 0), ragged, g)
        else:
            geo = geometry(Window(cb.lo, cb.hi, bm), nq, nk)
            width = geo.c * bm
            calls = len(geo.regions) * (p.batch if p.padded else 1)
            flash(counts, bh * geo.nqb * bm * width, bm, True, g)
            _add(counts, "call", calls * (6 if g else 3))
            _add(counts, "byte", bh * (2 * geo.kblocks * bm + geo.nqb * bm) * D * e)     # padded K, V; out
            if g:       # pads again, dq written, window gradients added back block by block
                _add(counts, "byte", bh * (2 * geo.kblocks * bm + (2 * geo.c + 1) * geo.nqb * bm) * D * e)
    pieces = len(d.bands)
    if d.cols:
        flash(counts, p.bh * p.n_q * len(d.cols), p.n_q, True, g)
        pieces += 1
    if d.rows:
        flash(counts, p.bh * len(d.rows) * p.n_k, len(d.rows), True, g)
    _add(counts, "byte", (pieces - 1) * 3 * p.bh * p.n_q * D * e * (2 if g else 1))             # merges
    _add(counts, "call", 4 + 4 * pieces)
    return Work.of(counts, note=f"{len(d.bands)} band(s), {len(d.cols)} global column(s), {len(d.rows)} row(s)")


# --------------------------------------------------------------------------------------- block-sparse
EXACT_UP_TO = 1 << 14      # tile statistics beyond this length are extrapolated from two smaller layouts


@functools.lru_cache(maxsize=64)
def tile_stats(mask: M.Mask, n_q: int, n_k: int, bm: int, bn: int, q_offset: int = 0) -> tuple:
    """(nonempty tiles, partial tiles, tiles in rows with a partial tile, rows) of the closed-form layout
    (a ragged last key tile counts as partial). Above `EXACT_UP_TO` tokens (square problems) the counts are
    fitted as `c + a N + b N^2` through the layouts at EXACT_UP_TO / 4, / 2 and EXACT_UP_TO, which is exact
    for bands, index sets and blocks, and keeps a plan at a million tokens to milliseconds."""
    if n_q == n_k and n_q > EXACT_UP_TO and not q_offset:
        ns = (EXACT_UP_TO // 4, EXACT_UP_TO // 2, EXACT_UP_TO)
        stats = [tile_stats(mask, n, n, bm, bn)[:3] for n in ns]
        basis = torch.tensor([[1.0, n, n * n] for n in ns], dtype=torch.float64)
        coef = torch.linalg.solve(basis, torch.tensor(stats, dtype=torch.float64))      # [3 terms, 3 stats]
        est = torch.tensor([1.0, n_q, n_q * n_q], dtype=torch.float64) @ coef
        return (*(max(0, round(float(x))) for x in est), -(-n_q // bm))
    lay = tile_layout(mask, n_q, n_k, bm, bn, q_offset=q_offset)
    length = lay.row_ptr.diff()
    partial = lay.cls == PARTIAL
    if n_k % bn:
        partial = partial | (lay.col_idx == lay.shape[1] - 1)
    partial_rows = torch.zeros(lay.shape[0], dtype=torch.bool)
    partial_rows[lay.row_ids()[partial]] = True
    return lay.nnz, int(partial.sum()), int(length[partial_rows].sum()), lay.shape[0]


def blocksparse_work(p: Problem, bm: int, bn: int, fused: bool) -> Work:
    nnz, _, masked_tiles, rows = tile_stats(p.stage.mask, p.n_q, p.n_k, bm, bn, p.q_offset)
    runtime = bool(M.runtime_inputs(p.stage.mask))
    counts: dict = {}
    elems, masked = p.bh * nnz * bm * bn, p.bh * (nnz if p.padded or runtime else masked_tiles) * bm * bn
    chunks = math.ceil(elems / BUDGET) + 2
    per_batch = p.batch if (p.padded or runtime) else 1
    e, D = elt(p), p.head_dim
    if fused:
        flash(counts, elems - masked, bm, False, p.grad)
        flash(counts, masked, bm, True, p.grad)
    else:
        counts["bmm"] = elems
        if p.grad:
            counts["bmm.bwd"] = elems
    gathered = p.bh * nnz * bn * 2 * D * e + p.bh * rows * bm * D * e * 3
    _add(counts, "byte", gathered * (2.5 if p.grad else 1) + masked * (2 if p.grad else 1) / p.heads)
    _add(counts, "call", chunks * per_batch * (12 if p.grad else 6))
    return Work.of(counts, note=f"{nnz} nonempty {bm}x{bn} tiles")


# ------------------------------------------------------------------------------------ dense, causal, flex
def dense_work(p: Problem) -> Work:
    counts: dict = {}
    masked = p.stage.mask != M.FULL or p.padded
    flash(counts, p.bh * p.n_q * p.n_k, p.n_q, masked, p.grad)
    if p.padded or M.runtime_inputs(p.stage.mask):
        _add(counts, "byte", p.batch * p.n_q * p.n_k * elt(p) * 2)          # the per-call mask
    _add(counts, "call", 2)
    return Work.of(counts)


def causal_work(p: Problem) -> Work:
    counts: dict = {}
    flash(counts, p.bh * causal_elems(p.n_q, p.n_k), p.n_q, False, p.grad)
    _add(counts, "call", 1)
    return Work.of(counts)


def flex_work(p: Problem, block: int, compiled: bool) -> Work:
    nnz, partial, _, _ = tile_stats(p.stage.mask, p.n_q, p.n_k, block, block, p.q_offset)
    counts = {"flex": p.bh * nnz * block * block, "flex.mask": p.bh * partial * block * block, "call": 3}
    return Work.of(counts, once={} if compiled else {"flex.compile": 1.0})

