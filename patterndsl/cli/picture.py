"""Pictures of a compiled pattern's masks: one panel per stage (or head group), drawn with matplotlib (tile
grid overlaid, density in the title) or as ASCII for a terminal.

>>> import patterndsl as pd
>>> from patterndsl.ir.mask import sliding
>>> from patterndsl.ir.program import ProgramIR, Softmax, Stage
>>> op = pd.AttentionOp(None, ProgramIR("local", (Stage("out", Softmax(), sliding(1)),), ("out",)))
>>> print(ascii_picture(panels(op, 6, block=3)))
local  out = attend softmax over sliding(1): density 44.4%, 4/4 tiles of 3x3 nonzero (0 full)
##....
###...
.###..
..###.
...###
....##
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import Linear, Nested, Softmax
from .workload import runtime_example, stage_lengths


@dataclass
class Panel:
    """One picture: a title, the dense mask `[n_q, n_k]` and its tile classes `[ceil(n_q/b), ceil(n_k/b)]`
    (0 empty, 1 partial, 2 full) for tiles of `block` x `block`."""
    program: str
    title: str
    mask: torch.Tensor
    tiles: torch.Tensor
    block: int
    label: str = "mask"

    @property
    def density(self) -> float:
        return self.mask.float().mean().item() if self.mask.numel() else 0.0

    def caption(self) -> str:
        nz, full = int((self.tiles > 0).sum()), int((self.tiles == 2).sum())
        return (f"density {100 * self.density:.1f}%, {nz}/{self.tiles.numel()} tiles of {self.block}x{self.block} "
                f"nonzero ({full} full)")


def dense_tile_classes(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Tile classes of a dense mask: 0 empty, 1 partial, 2 full (edge tiles judged on their valid part)."""
    n_q, n_k = mask.shape
    tq, tk = -(-n_q // block), -(-n_k // block)
    pad = torch.zeros(tq * block, tk * block, dtype=torch.float32)
    valid = torch.zeros_like(pad)
    pad[:n_q, :n_k] = mask.float()
    valid[:n_q, :n_k] = 1
    on = pad.view(tq, block, tk, block).sum(dim=(1, 3))
    cells = valid.view(tq, block, tk, block).sum(dim=(1, 3))
    return torch.where(on == 0, 0, torch.where(on == cells, 2, 1)).to(torch.int8)


def _norm(stage) -> str:
    n = stage.normaliser
    if isinstance(n, Softmax):
        return "softmax"
    if isinstance(n, Linear):
        return f"linear({type(n.feature_map).__name__.lower()})"
    return f"nested({n.packed})" if isinstance(n, Nested) else "?"


def short_mask(m: M.Mask) -> str:
    """A compact spelling of a mask for titles: `sliding(8) | global({0})`, `causal & same(doc)` (`Mask.label`)."""
    return m.label()


def _title(stage, limit: int = 100) -> str:
    src = "" if stage.query == "input" and stage.keys == "input" else f" query {stage.query} keys {stage.keys}"
    heads = f"heads[{stage.heads[0]}:{stage.heads[1]}] " if stage.heads else ""
    name = "" if stage.name.startswith("_") else f"{stage.name} = "   # anonymous stages are `_<k>`
    text = short_mask(stage.mask)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{heads}{name}attend {_norm(stage)}{src} over {text}"


def panels(op, n: int, block: int = 64) -> list[Panel]:
    """A panel per stage (per head group for per-head programs) at sequence length `n`."""
    if not isinstance(n, int) or n < 1:
        raise PatternError(f"the sequence length must be an int >= 1, got {n!r}")
    if block < 1:
        raise PatternError(f"the tile size must be >= 1, got {block}")
    ir = op.ir
    stages = [ir.stage(o) for o in ir.outputs] if ir.by_heads else list(ir.stages)
    lengths = stage_lengths(ir, n)
    runtime = runtime_example(op, 1, n)
    out = []
    for st in stages:
        n_q, n_k = lengths[st.name]
        m = op.mask(n_q, n_k, stage=st.name, runtime=runtime)
        m = m[0] if m.dim() == 3 else m
        label = " ".join(x for x in (f"heads[{st.heads[0]}:{st.heads[1]}]" if st.heads else "",
                                     "" if st.name.startswith("_") else st.name) if x) or "mask"
        out.append(Panel(op.name, _title(st), m, dense_tile_classes(m, block), block, label))
    return out


# ------------------------------------------------------------------------------------------------ ASCII
def ascii_picture(pics: list[Panel], width: int = 64) -> str:
    """Each panel as text: `#` all pairs allowed, `+` some, `.` none, one character per cell of pairs."""
    blocks = []
    for p in pics:
        n_q, n_k = p.mask.shape
        cell = max(1, -(-max(n_q, n_k) // width))
        rows, cols = -(-n_q // cell), -(-n_k // cell)
        pad = torch.full((rows * cell, cols * cell), float("nan"))
        pad[:n_q, :n_k] = p.mask.float()
        frac = pad.view(rows, cell, cols, cell).nanmean(dim=(1, 3))
        lines = ["".join("#" if f == 1 else "+" if f > 0 else "." for f in row.tolist()) for row in frac]
        scale = f" (1 char = {cell}x{cell} pairs)" if cell > 1 else ""
        blocks.append(f"{p.program}  {p.title}: {p.caption()}{scale}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------------------------- matplotlib
def _pyplot(what: str = "drawing masks", instead: str = "or use --ascii"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PatternError(f"{what} needs matplotlib, which is not installed",
                           hint=f"pip install 'patterndsl[plot]' (or matplotlib), {instead}") from None
    return plt


def _pooled(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """The fraction of allowed pairs per picture cell, at most `pixels` cells a side."""
    n_q, n_k = mask.shape
    cell = max(1, -(-max(n_q, n_k) // pixels))
    rows, cols = -(-n_q // cell), -(-n_k // cell)
    pad = torch.zeros(rows * cell, cols * cell)
    pad[:n_q, :n_k] = mask.float()
    return pad.view(rows, cell, cols, cell).mean(dim=(1, 3))


def draw(pics: list[Panel], path, title: str | None = None, pixels: int = 256, dpi: int = 80) -> None:
    """Write the panels side by side (4 a row) to an image file (PNG, SVG, PDF by the suffix)."""
    plt = _pyplot()
    import numpy as np
    ncol = min(4, len(pics))
    nrow = -(-len(pics) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(5.0, 4.2 * ncol), 4.6 * nrow + 0.4), squeeze=False)
    for ax in axes.flat[len(pics):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, pics):
        n_q, n_k = p.mask.shape
        img = _pooled(p.mask, pixels).numpy() ** 0.5        # sqrt: thin bands stay visible when pooled
        aspect = "equal" if max(n_q, n_k) <= 3 * min(n_q, n_k) else "auto"   # Luna's pack stage: l x N
        ax.imshow(img, cmap="Greys", vmin=0, vmax=1, extent=(0, n_k, n_q, 0), interpolation="nearest",
                  aspect=aspect)
        tq, tk = p.tiles.shape
        tint = np.zeros((tq, tk, 4))
        tint[p.tiles.numpy() == 1] = (1.0, 0.55, 0.0, 0.18)   # partial tiles: orange
        tint[p.tiles.numpy() == 2] = (0.0, 0.45, 0.9, 0.18)   # full tiles: blue
        ax.imshow(tint, extent=(0, tk * p.block, tq * p.block, 0), interpolation="nearest", aspect=aspect)
        if max(tq, tk) <= 64:
            for x in range(0, tk * p.block + 1, p.block):
                ax.axvline(x, color="0.6", lw=0.4)
            for y in range(0, tq * p.block + 1, p.block):
                ax.axhline(y, color="0.6", lw=0.4)
        ax.set_xlim(0, n_k)
        ax.set_ylim(n_q, 0)
        ax.set_title("\n".join(textwrap.wrap(p.title, 52) + [p.caption()]), fontsize=8)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
