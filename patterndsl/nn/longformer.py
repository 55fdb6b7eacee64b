"""`LongformerAttention`: Longformer self-attention (Beltagy et al. 2020) with separate global projections.

>>> import torch
>>> layer = LongformerAttention(16, num_heads=4, window=4, backend="reference")
>>> glob = torch.zeros(2, 10, dtype=torch.bool); glob[0, 0] = glob[1, [3, 7]] = True
>>> layer(torch.randn(2, 10, 16), global_mask=glob).shape
torch.Size([2, 10, 16])

With one-sided window `w = window // 2` and per-row global tokens G (a runtime `(B, N)` bool mask):
- a non-global query i attends, with the local projections q, k, v, to keys `|i - j| <= w*d` (and
  `(i - j) % d == 0` for dilation d) plus every global key, in one softmax (a global key counts once);
- a global query attends to every key with `query_global`, `key_global`, `value_global`;
- padded keys (`key_padding_mask` True) are ignored and padded queries output 0.
The local part is one op, the program `LOCAL`: `sliding(w, d) | ~same(glob)` with runtime ids `glob` = 0
for ordinary tokens and `i + 1` for a global token i, so `~same(glob)` holds exactly when i or j is global
(and i != j: the diagonal is in the band anyway): per-row global sets in one call. The global rows are gathered (B, G)
and run through `GLOBAL` (a `full` op), then scattered back. Any sequence length works.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PatternError
from ._common import check_dims, check_input, check_padding, make_op, merge_heads, split_heads

GLOBAL_IDS = "glob"
# Longformer's pattern with the global set read at run time: `~same(glob)` stands for `global(globals)`.
LOCAL = """pattern longformer_local(window: int = 512, dilation: int = 1) {
    attend softmax over sliding(window // 2, dilation) | ~same(glob)
}"""
GLOBAL = "pattern longformer_global() { attend softmax over full }"


class LongformerAttention(nn.Module):
    """`forward(x, key_padding_mask=None, global_mask=None) -> (B, N, E)`; x `(B, N, E)`, masks bool `(B, N)`.

    `window` is the total window (as transformers' `attention_window`, even); `output_projection=False`
    drops `out_proj` (transformers' `LongformerSelfAttention` has none: its output dense is in the next block).
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, dilation: int = 1, dropout: float = 0.0,
                 bias: bool = True, output_projection: bool = True, backend: str = "auto"):
        super().__init__()
        self.head_dim = check_dims(embed_dim, num_heads)
        for nm, val, low in (("window", window, 0), ("dilation", dilation, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                raise PatternError(f"{nm} must be an int >= {low}, got {val!r}")
        self.embed_dim, self.num_heads, self.window, self.dilation = embed_dim, num_heads, window, dilation
        lin = lambda: nn.Linear(embed_dim, embed_dim, bias=bias)  # noqa: E731
        self.query, self.key, self.value = lin(), lin(), lin()
        self.query_global, self.key_global, self.value_global = lin(), lin(), lin()
        self.out_proj = lin() if output_projection else None
        self.dropout = nn.Dropout(dropout)
        self.local_op = make_op(LOCAL, backend, window=window, dilation=dilation)
        self.global_op = make_op(GLOBAL, backend)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                global_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.embed_dim, dtype=self.query.weight.dtype)
        kpm = check_padding(key_padding_mask, x)
        glob = check_padding(global_mask, x, "global_mask")
        B, N, _ = x.shape
        if glob is None:
            glob = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        if kpm is not None:
            glob = glob & ~kpm                                   # a padded token is never global
        h = self.num_heads
        ids = torch.where(glob, torch.arange(1, N + 1, device=x.device), 0)
        out = self.local_op(split_heads(self.query(x), h), split_heads(self.key(x), h),
                            split_heads(self.value(x), h), key_padding_mask=kpm, **{GLOBAL_IDS: ids})
        if glob.any():
            out = self._global_rows(x, out, glob, kpm)
        if kpm is not None:
            out = out.masked_fill(kpm[:, None, :, None], 0.0)
        out = self.dropout(merge_heads(out))
        return self.out_proj(out) if self.out_proj is not None else out

    def _global_rows(self, x, out, glob, kpm):
        """Overwrite the global rows of `out` [B, H, N, D] with their full attention (global projections)."""
        h = self.num_heads
        count = glob.sum(-1)                                                    # [B]
        G = int(count.max())
        order = torch.sort((~glob).to(torch.int8), dim=-1, stable=True).indices[:, :G]   # global rows first
        xg = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))           # (B, G, E)
        og = self.global_op(split_heads(self.query_global(xg), h), split_heads(self.key_global(x), h),
                            split_heads(self.value_global(x), h), key_padding_mask=kpm)  # [B, H, G, D]
        real = (torch.arange(G, device=x.device)[None] < count[:, None])[:, None, :, None]
        idx = order[:, None, :, None].expand(-1, h, -1, out.shape[-1])
        current = torch.gather(out, 2, idx)
        return out.scatter(2, idx, torch.where(real, og.to(out.dtype), current))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}, "
                f"dilation={self.dilation}")
