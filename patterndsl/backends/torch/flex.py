"""Compiled FlexAttention with a BlockMask built from the closed-form layout (never `create_block_mask`).

The layout classifies every `BLOCK x BLOCK` tile as empty, partial or full in time proportional to the
nonempty tiles; partial tiles become the BlockMask's `kv_indices` (the mask_mod runs there) and full tiles
its `full_kv_indices` (no mask_mod). `torch.compile(flex_attention)` is compiled once per process and shape
(inductor's on-disk cache makes a later process's compile cheaper); block masks are cached per
(mask, lengths, device). FlexAttention has no CPU backward, so on the CPU this lowering runs forward only.

>>> import torch
>>> from patterndsl.ir.mask import sliding
>>> bm = block_mask(sliding(200), 512, 512, torch.device("cpu"))
>>> bm.shape
(1, 1, 512, 512)
"""
from __future__ import annotations

import functools
import os
import shutil

import torch

from ...ir import mask as M
from ...plan.layout import FULL, PARTIAL, tile_layout

BLOCK = 128
_COMPILED: dict = {}
_SEEN: set = set()


@functools.lru_cache(maxsize=1)
def compiler_available() -> bool:
    """torch.compile's CPU code needs a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def _dense_indices(layout, cls: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_blocks `[1, 1, nqb]`, indices `[1, 1, nqb, nkb]`) int32 of the tiles of class `cls` per row."""
    nqb, nkb = layout.shape
    keep = layout.cls == cls
    rows = layout.row_ids()[keep]
    cols = layout.col_idx[keep]
    count = torch.bincount(rows, minlength=nqb)
    rank = torch.arange(rows.numel()) - (torch.cumsum(count, 0) - count)[rows]
    idx = torch.zeros(nqb, max(nkb, 1), dtype=torch.int32)
    idx[rows, rank] = cols.to(torch.int32)
    return count.to(torch.int32).view(1, 1, nqb).to(device), idx.view(1, 1, nqb, -1).to(device)


@functools.lru_cache(maxsize=16)
def block_mask(mask: M.Mask, n_q: int, n_k: int, device: torch.device, q_offset: int = 0):
    """The BlockMask of `mask` at `n_q x n_k` (query row r at position `q_offset + r`) from the closed-form
    layout."""
    from torch.nn.attention.flex_attention import BlockMask
    from ...export.flex import mask_fn
    layout = tile_layout(mask, n_q, n_k, BLOCK, BLOCK, q_offset=q_offset)
    f = mask_fn(mask, n_q, n_k, None, device, q_offset)
    part_n, part_i = _dense_indices(layout, PARTIAL, device)
    full_n, full_i = _dense_indices(layout, FULL, device)
    return BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=BLOCK,
                                    mask_mod=lambda b, h, q, kv: f(b, q, kv), seq_lengths=(n_q, n_k))


def _compiled():
    if "flex" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def shape_key(q_shape, k_shape, v_shape, dtype, device) -> tuple:
    return (tuple(q_shape), tuple(k_shape), tuple(v_shape), dtype, str(device))


def compiled_for(key: tuple) -> bool:
    """Whether this process already compiled Flex for these shapes."""
    return key in _SEEN


def flex_attention(q, k, v, mask: M.Mask, scale: float, q_offset: int = 0):
    """Compiled FlexAttention of `mask` (no padding, no runtime ids): `[B, H, N_q, D_v]`; k, v may have
    fewer heads (`enable_gqa`, never repeated); query row r at position `q_offset + r`."""
    bm = block_mask(mask, q.shape[2], k.shape[2], q.device, int(q_offset))
    out = _compiled()(q, k, v, block_mask=bm, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    _SEEN.add(shape_key(q.shape, k.shape, v.shape, q.dtype, q.device))
    return out
