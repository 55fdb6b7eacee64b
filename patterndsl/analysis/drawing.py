"""A picture of receptive fields: one row per layer, tokens along x, shaded by the share of each pixel's
tokens that can influence the query (matplotlib, optional like `patterndsl show`)."""
from __future__ import annotations

import torch


def field_image(r, pixels: int = 1024) -> torch.Tensor:
    """[layers, <= pixels]: the share of each cell's tokens in the field after each layer."""
    cell = max(1, -(-r.n // pixels))
    cols = -(-r.n // cell)
    out = torch.zeros(len(r.runs), cols)
    for layer in range(1, len(r.runs) + 1):
        bits = torch.zeros(cols * cell)
        bits[:r.n] = r.keys(layer).float()
        out[layer - 1] = bits.view(cols, cell).mean(1)
    return out


def draw_reach(r, path, pixels: int = 1024, dpi: int = 100) -> None:
    """Write the fields of a `Reach` to an image file (PNG, SVG, PDF by the suffix)."""
    from ..cli.picture import _pyplot
    plt = _pyplot("drawing receptive fields", "or read the text picture")
    img = field_image(r, pixels).numpy() ** 0.5            # sqrt: thin fields stay visible when pooled
    layers = len(r.runs)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * layers))
    ax.imshow(img, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
              extent=(0, r.n, layers + 0.5, 0.5))
    ax.axvline(r.query, color="tab:red", lw=0.8)
    ax.set_xlabel("key token j")
    ax.set_ylabel("layer")
    ax.set_title(f"tokens that can influence query {r.query} (N = {r.n}); {r.depth_note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
