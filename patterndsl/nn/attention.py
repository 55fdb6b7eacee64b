"""`Attention`: a multi-head attention layer (projections included) computing any patterndsl program.

>>> import torch
>>> from patterndsl.ir import mask as M
>>> from patterndsl.ir.program import ProgramIR, Softmax, Stage
>>> prog = ProgramIR("local", (Stage("out", Softmax(), M.sliding(2)),), ("out",))
>>> layer = Attention(prog, embed_dim=16, num_heads=4, backend="reference")
>>> layer(torch.randn(2, 10, 16)).shape
torch.Size([2, 10, 16])
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PatternError
from ..ir.program import INPUT, Favor, Linear, Nested, ReluFeatures
from ..op import NESTED_KEYS
from ._common import check_dims, check_input, check_padding, make_op, merge_heads, split_heads


class Attention(nn.Module):
    """Multi-head attention over a program, with `(B, N, E)` inputs like
    `nn.MultiheadAttention(batch_first=True)` (self-attention).

    `program`: a built-in name, `.attn` text or path, a `Program`, a `ProgramIR` or an `AttentionOp`;
    `**params` override the pattern's parameters. Projections: `q_proj` if a stage queries `input`, `k_proj`
    and `v_proj` if a stage reads keys from `input`, `c_proj` (the pack keys) for causal Luna stages, and
    `out_proj`. The op takes one q, k, v, so stages reading `input` in the same role share that projection
    (in per-head programs each stage owns its heads' slice of it). Learned `param p[l]` tensors are
    parameters `[H, l, head_dim]` drawn from N(0, head_dim^-1/2). Random-feature stages with `redraw = K`
    draw a fresh projection every K training calls. `dropout` acts on the attention output (the op exposes
    no attention probabilities).

    `forward(x, key_padding_mask=None, **inputs)`: x `(B, N, E)`, `key_padding_mask` bool `(B, N)` (True =
    padding), `inputs` the program's runtime ids (`same(name)`: LongTensor `(B, N)`). Returns `(B, N, E)`;
    a program with several outputs returns a tuple: the projected first output, then the others with heads
    merged (Luna: `(out (B, N, E), packed (B, l, E))`).
    """

    def __init__(self, program, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 backend: str = "auto", **params):
        super().__init__()
        self.head_dim = check_dims(embed_dim, num_heads)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise PatternError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.op = make_op(program, backend, **params)
        ir = self.op.ir
        if ir.num_heads is not None and ir.num_heads != num_heads:
            raise PatternError(f"program {ir.name} splits {ir.num_heads} heads, but the layer has num_heads = "
                               f"{num_heads}", hint="set num_heads to match the program's head ranges")
        self.reads_query = any(st.query == INPUT for st in ir.stages)
        self.reads_keys = any(st.keys == INPUT for st in ir.stages)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if self.reads_query else None
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if self.reads_keys else None
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if self.reads_keys else None
        nested = any(isinstance(st.normaliser, Nested) for st in ir.stages)
        self.c_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if nested else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.params = nn.ParameterDict({
            name: nn.Parameter(torch.randn(num_heads, length, self.head_dim) * self.head_dim ** -0.5)
            for name, length in ir.params})
        maps = [st.normaliser.feature_map for st in ir.stages if isinstance(st.normaliser, Linear)]
        intervals = [fm.redraw for fm in maps if isinstance(fm, (Favor, ReluFeatures))]
        self.redraw_interval = min([r for r in intervals if r > 0], default=0)
        self.training_calls = 0

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, **inputs):
        check_input(x, self.embed_dim, dtype=self.out_proj.weight.dtype)
        key_padding_mask = check_padding(key_padding_mask, x)
        for name in inputs:
            if name in self.params or (name == NESTED_KEYS and self.c_proj is not None):
                raise PatternError(f"'{name}' is computed by the layer, do not pass it",
                                   hint="the layer owns its learned params and projections")
        if self.training and self.redraw_interval:
            if self.training_calls and self.training_calls % self.redraw_interval == 0:
                self.op.redraw()
            self.training_calls += 1
        h = self.num_heads
        q = split_heads(self.q_proj(x), h) if self.q_proj is not None else None
        k = split_heads(self.k_proj(x), h) if self.k_proj is not None else None
        v = split_heads(self.v_proj(x), h) if self.v_proj is not None else None
        q = q if q is not None else k                         # an unread role: any tensor of the right shape
        k, v = (k, v) if k is not None else (q, q)
        args = dict(inputs)
        args.update({name: p.to(q.dtype) for name, p in self.params.items()})
        if self.c_proj is not None:
            args[NESTED_KEYS] = split_heads(self.c_proj(x), h)
        out = self.op(q, k, v, key_padding_mask=key_padding_mask, **args)
        if isinstance(out, tuple):
            return (self._project(out[0]),) + tuple(merge_heads(o) for o in out[1:])
        return self._project(out)

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"{self.op.name}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, backend={self.op.backend}"
