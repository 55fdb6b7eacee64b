"""Helpers shared by the layers: head split/merge, input checks, and turning a program into an op."""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..inputs import check_key_padding_mask


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*D) -> [B, H, N, D]."""
    B, N, E = x.shape
    return x.view(B, N, num_heads, E // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> (B, N, H*D)."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def check_dims(embed_dim, num_heads) -> int:
    """The head dim `embed_dim // num_heads`, or a PatternError naming what does not divide."""
    for nm, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise PatternError(f"{nm} must be an int >= 1, got {val!r}")
    if embed_dim % num_heads:
        raise PatternError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}",
                           hint="choose num_heads so that embed_dim = num_heads * head_dim")
    return embed_dim // num_heads


def check_input(x, embed_dim: int, name: str = "x", dtype: torch.dtype | None = None) -> None:
    """`x` must be a floating (B, N, embed_dim) tensor (of the layer's `dtype`, when given)."""
    if not isinstance(x, torch.Tensor):
        raise PatternError(f"{name} must be a torch.Tensor (B, N, {embed_dim}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise PatternError(f"{name} must be (B, N, {embed_dim}) (batch, tokens, embed_dim), got "
                           f"({', '.join(map(str, x.shape))})")
    if dtype is not None and x.dtype != dtype:
        raise PatternError(f"{name} must have the layer's dtype {dtype}, got {x.dtype}",
                           hint=f"convert the input (x.to({dtype})) or the layer (layer.to({x.dtype}))")


def check_padding(mask, x: torch.Tensor, name: str = "key_padding_mask"):
    """None, or a bool (B, N) tensor for `x` (B, N, E), on x's device (the op's message when it is not)."""
    check_key_padding_mask(mask, x.shape[0], x.shape[1], name)
    return None if mask is None else mask.to(x.device)


def make_op(program, backend: str = "auto", **params):
    """An `AttentionOp` from an op (returned as is), a `ProgramIR`, or anything `pd.compile` takes."""
    from ..ir.program import ProgramIR
    from ..op import AttentionOp
    if isinstance(program, AttentionOp):
        if params:
            raise PatternError(f"parameters {', '.join(sorted(params))} cannot be applied to a compiled op",
                               hint="pass the program (name, text or path) instead, or compile with them")
        return program
    if isinstance(program, ProgramIR):
        options = {k: params.pop(k) for k in list(params) if k == "projection"}
        if params:
            raise PatternError(f"parameters {', '.join(sorted(params))} cannot be applied to an IR program")
        return AttentionOp(None, program, backend=backend, **options)
    from ..api import compile as compile_program
    return compile_program(program, backend=backend, **params)
