"""`LunaLayer`: a Luna encoder layer (Ma et al. 2021) as in fairseq-apollo, its attention run by patterndsl ops.

>>> import torch
>>> layer = LunaLayer(16, num_heads=4, length=3, backend="reference")
>>> x, p = layer(torch.randn(2, 10, 16))
>>> x.shape, p.shape
(torch.Size([2, 10, 16]), torch.Size([2, 3, 16]))

Bidirectional (tied keys and values, docs/language.md §4.3), with `P` the packed sequence `(B, l, E)`:
    pack:    Yp = softmax(pq(P) dp^-1/2 . C^T) C,  C = pc(X)   (per packed head; padded X masked; no out proj)
    unpack:  Y  = out(softmax(q(X) dh^-1/2 . K^T) V),  K = V = c(Yp)
    post-LN: XA = LN(X + Y), P' = LN_p(P + Yp), X' = LN_f(XA + FFN(XA))   (P has no FFN)
    pre-LN:  XA = X + Y(LN(X), LN_p(P)), P' = P + Yp, X' = XA + FFN(LN_f(XA))
The pack and unpack are the built-in `luna`'s two stages run as two ops, because the projection c sits
between them (the program's unpack reads the packed values directly). Causal (`causal=True`): the
built-in `luna_causal`, nested attention with `p = pq(P)`, `c = pc(X)`, `k = v = c(X)`; `P` is returned
unchanged (no pack output to add).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..api import builtin
from ..errors import PatternError
from ..ir.program import INPUT, ProgramIR
from ._common import check_dims, check_input, check_padding, make_op, merge_heads, split_heads

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def split_luna(length: int) -> tuple[ProgramIR, ProgramIR]:
    """The built-in `luna` as two programs: its pack stage, and its unpack stage reading keys from `input`
    (the layer puts c(Yp) there)."""
    ir = builtin("luna").lower(length=length)
    pack = ProgramIR("luna_pack", (ir.stage("packed"),), ("packed",), params=ir.params)
    unpack = ProgramIR("luna_unpack", (replace(ir.stage("out"), keys=INPUT),), ("out",))
    return pack, unpack


class LunaLayer(nn.Module):
    """Luna layer: `forward(x, p=None, key_padding_mask=None) -> (x', p')`.

    x `(B, N, E)`; p `(B, l, E)` or `(l, E)` (default: the layer's learned `packed`, N(0, E^-1/2));
    `key_padding_mask` bool `(B, N)`, True = padding. `num_pheads` (default `num_heads`) splits the pack.
    """

    def __init__(self, embed_dim: int, num_heads: int, length: int, ffn_dim: int | None = None,
                 dropout: float = 0.0, activation: str = "relu", normalize_before: bool = False,
                 causal: bool = False, num_pheads: int | None = None, bias: bool = True, backend: str = "auto"):
        super().__init__()
        check_dims(embed_dim, num_heads)
        self.num_pheads = num_heads if num_pheads is None else num_pheads
        check_dims(embed_dim, self.num_pheads)
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise PatternError(f"length must be an int >= 1, got {length!r}")
        if activation not in _ACTIVATIONS:
            raise PatternError(f"unknown activation '{activation}'", hint=f"one of: {', '.join(_ACTIVATIONS)}")
        self.embed_dim, self.num_heads, self.length = embed_dim, num_heads, length
        self.normalize_before, self.causal = normalize_before, causal
        self.activation = _ACTIVATIONS[activation]
        lin = lambda: nn.Linear(embed_dim, embed_dim, bias=bias)  # noqa: E731
        self.pq_proj, self.pc_proj, self.q_proj, self.c_proj, self.out_proj = lin(), lin(), lin(), lin(), lin()
        self.packed = nn.Parameter(torch.randn(length, embed_dim) * embed_dim ** -0.5)
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.p_norm = nn.LayerNorm(embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        ffn_dim = 4 * embed_dim if ffn_dim is None else ffn_dim
        self.fc1, self.fc2 = nn.Linear(embed_dim, ffn_dim), nn.Linear(ffn_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        if causal:
            self.causal_op = make_op("luna_causal", backend, length=length)
        else:
            pack, unpack = split_luna(length)
            self.pack_op, self.unpack_op = make_op(pack, backend), make_op(unpack, backend)

    def forward(self, x: torch.Tensor, p: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None):
        check_input(x, self.embed_dim, dtype=self.out_proj.weight.dtype)
        key_padding_mask = check_padding(key_padding_mask, x)
        p = self._packed(p, x)
        xn = self.attn_norm(x) if self.normalize_before else x
        if self.causal:
            y, yp = self._causal(xn, p, key_padding_mask), None
        else:
            pn = self.p_norm(p) if self.normalize_before else p
            y, yp = self._pack_unpack(xn, pn, key_padding_mask)
        x = x + self.dropout(y)
        if yp is not None:
            p = p + self.dropout(yp)
        if not self.normalize_before:
            x = self.attn_norm(x)
            p = self.p_norm(p) if yp is not None else p
        h = self.ffn_norm(x) if self.normalize_before else x
        x = x + self.dropout(self.fc2(self.activation(self.fc1(h))))
        if not self.normalize_before:
            x = self.ffn_norm(x)
        return x, p

    def _packed(self, p, x) -> torch.Tensor:
        B = x.shape[0]
        if p is None:
            p = self.packed
        ok = isinstance(p, torch.Tensor) and p.dim() in (2, 3) and tuple(p.shape[-2:]) == (self.length, self.embed_dim)
        if not ok or (p.dim() == 3 and p.shape[0] != B):
            got = f"({', '.join(map(str, p.shape))})" if isinstance(p, torch.Tensor) else type(p).__name__
            raise PatternError(f"p must be ({B}, {self.length}, {self.embed_dim}) or ({self.length}, "
                               f"{self.embed_dim}), got {got}")
        return p.to(x.dtype).expand(B, self.length, self.embed_dim)

    def _pack_unpack(self, x, p, kpm):
        hp, h = self.num_pheads, self.num_heads
        c = split_heads(self.pc_proj(x), hp)
        packed = self.pack_op(c, c, c, key_padding_mask=kpm, p=split_heads(self.pq_proj(p), hp))
        yp = merge_heads(packed)                                           # (B, l, E)
        kv = split_heads(self.c_proj(yp), h)
        y = self.unpack_op(split_heads(self.q_proj(x), h), kv, kv)
        return self.out_proj(merge_heads(y)), yp

    def _causal(self, x, p, kpm):
        h = self.num_heads
        kv = split_heads(self.c_proj(x), h)
        out = self.causal_op(split_heads(self.q_proj(x), h), kv, kv, key_padding_mask=kpm,
                             p=split_heads(self.pq_proj(p), h), c=split_heads(self.pc_proj(x), h))
        return self.out_proj(merge_heads(out))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, length={self.length}, "
                f"causal={self.causal}, normalize_before={self.normalize_before}")
