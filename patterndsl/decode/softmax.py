"""Softmax attention over keys at arbitrary positions, and the key buffer of a softmax stage while decoding.

A decode cache keeps only the keys later queries may still see (`Mask.retained`), so its keys are not the
positions 0 .. N_k - 1 a call assumes: `attend_at` evaluates the mask at the queries' absolute positions and
the keys' own positions (`mask.at` with `PositionOps`, whose runtime ids are looked up by position) and runs
one dense, masked softmax over them, query rows in blocks. Grouped-query heads fold into rows: kv heads are
never repeated. A row with no allowed key outputs zeros; a key no row may see is zeroed first, and when a kept
key is not finite each row is computed from its own keys only, so nothing masked reaches an output.
"""
from __future__ import annotations

import torch

from ..ir.dense import TorchMaskOps
from ..ir.mask import Mask

ROWS = 256            # query rows per block of attend_at (bounds the scores held at once)
_LOW = (torch.float16, torch.bfloat16)


class PositionOps(TorchMaskOps):
    """Mask ops for query rows at `q_offset ..` and keys at the sorted positions `k_pos`: runtime ids come from
    `q_ids[name]` (`[B, n]`, by row) and `k_ids[name]` (`[B, K]`, by slot of `k_pos`)."""

    def __init__(self, n_q: int, n_k: int, q_offset: int, k_pos: torch.Tensor, q_ids: dict, k_ids: dict):
        super().__init__(n_q, n_k, None, q_offset)
        self.k_pos, self.q_ids, self.k_ids = k_pos, q_ids, k_ids

    def ids(self, name: str, side: str, x):
        if side == "q":
            t = self.q_ids[name]
            return t[:, (x - self.q_offset).clamp(0, t.shape[1] - 1)]
        slot = torch.searchsorted(self.k_pos, x.contiguous()).clamp(max=max(self.k_pos.numel() - 1, 0))
        return self.k_ids[name][:, slot]


def allowed_at(mask: Mask, n_q: int, q_offset: int, k_pos: torch.Tensor, n_total: int, q_ids=None, k_ids=None):
    """bool `[n_q, K]` (or `[B, n_q, K]` with runtime ids): mask at query positions `q_offset + r` and keys at
    `k_pos`, in a call of `n_total` keys (which fixes `random`'s draw, as `op(..., q_offset=)` would)."""
    ops = PositionOps(n_q, n_total, q_offset, k_pos, q_ids or {}, k_ids or {})
    i = (q_offset + torch.arange(n_q, device=k_pos.device))[:, None]
    out = torch.as_tensor(mask.at(i, k_pos[None, :], ops), dtype=torch.bool, device=k_pos.device)
    full = (n_q, k_pos.numel())
    return out.expand(*out.shape[:out.dim() - 2], *full) if out.dim() > 2 else out.expand(full)


def attend_at(q, k, v, allowed: torch.Tensor, scale: float, finite: bool | None = None, terms=None) -> torch.Tensor:
    """Masked softmax attention. q `[B, H, n, D]`, k `[B, H_kv, K, D]`, v `[B, H_kv, K, D_v]`, allowed bool
    `[n, K]` or `[B, n, K]` (key padding included); `finite` says whether every key and value is finite (None:
    look); `terms(r, s)` applies a stage's score terms to the scaled scores `s` `[B, H_kv, G, n', K]` of rows
    `r .. r + n' - 1` (None: none). Returns `[B, H, n, D_v]` in q's dtype."""
    dtype = q.dtype
    work = torch.float32 if dtype in _LOW else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    ok = allowed if allowed.dim() == 3 else allowed[None]
    if finite is None:
        finite = bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())
    rowwise = False
    if not finite:                                  # a masked key must not reach an output through 0 * inf
        seen = ok.any(1)[:, None, :, None]                                     # keys some row may see
        k, v = torch.where(seen, k, 0.0), torch.where(seen, v, 0.0)
        rowwise = not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all()))
    step = 1 if rowwise else ROWS
    outs = [_block(q[:, :, r:r + step], k, v, ok[:, r:r + step], scale, rowwise,
                   None if terms is None else (lambda s, r=r: terms(r, s))) for r in range(0, q.shape[2], step)]
    out = torch.cat(outs, 2) if outs else q.new_zeros(*q.shape[:3], v.shape[3])
    return out.to(dtype)


def _block(q, k, v, ok, scale, rowwise: bool, terms=None):
    B, H, n, D = q.shape
    Hk = k.shape[1]
    G = H // Hk
    if rowwise:                                            # one row: only its own keys enter the products
        keep = ok[:, 0][:, None, :, None]
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    s = torch.matmul(q.reshape(B, Hk, G * n, D), k.transpose(-1, -2)).view(B, Hk, G, n, -1) * scale
    if terms is not None:
        s = terms(s)
    s = s.masked_fill(~ok[:, None, None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = p.sum(-1, keepdim=True)
    o = torch.matmul(p.view(B, Hk, G * n, -1), v).view(B, Hk, G, n, v.shape[-1])
    return (o / torch.where(total == 0, torch.ones_like(total), total)).reshape(B, H, n, v.shape[-1])


class KeyBuffer:
    """The keys and values of one softmax stage that later queries may still see, in position order:
    `k [B, H_kv, cap, D]`, `v`, `pos [cap]`, `valid [B, cap]` and runtime ids `[B, cap]`, the first `count`
    slots used. Keys are appended in place (the capacity doubles when full); once the buffer holds more than
    twice what the mask retains (plus a margin), the keys no later query can see are dropped, so a window
    costs O(window) per token and the work per appended key stays O(1) amortised."""

    MARGIN = 64

    def __init__(self, mask: Mask, names: tuple[str, ...]):
        self.mask, self.names = mask, names
        self.k = self.v = self.pos = self.valid = None
        self.ids: dict = {}
        self.count = 0
        self.contiguous = True           # the keys are positions 0 .. count - 1 (nothing dropped yet)
        self.finite = True               # every key and value appended so far is finite
        self.limit = 2 * self.MARGIN

    def append(self, k, v, valid, ids: dict, start: int) -> None:
        n = k.shape[2]
        if self.k is None:
            self._allocate(k, v, max(2 * n, self.MARGIN))
        if self.count + n > self.k.shape[2]:
            self._resize(2 * (self.count + n))
        a, b = self.count, self.count + n
        self.finite = self.finite and bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())
        self.k[:, :, a:b], self.v[:, :, a:b], self.valid[:, a:b] = k, v, valid
        self.pos[a:b] = torch.arange(start, start + n, device=self.pos.device)
        for name in self.names:
            self.ids[name][:, a:b] = ids[name]
        self.count = b

    def view(self):
        """(k, v, pos, valid, ids) of the used slots."""
        c = self.count
        return (self.k[:, :, :c], self.v[:, :, :c], self.pos[:c], self.valid[:, :c],
                {n: t[:, :c] for n, t in self.ids.items()})

    def evict(self, t: int) -> None:
        """Drop the keys no query at a position >= t can see, when the buffer has grown past its limit."""
        if self.count <= self.limit:
            return
        keep = self.mask.retained(t).holds(self.pos[:self.count])
        kept = int(keep.sum())
        if kept < self.count:
            idx = keep.nonzero().flatten()
            k, v, pos, valid, ids = self.view()
            cap = max(2 * (kept + self.MARGIN), self.MARGIN)
            self._allocate(k, v, cap)
            self.k[:, :, :kept], self.v[:, :, :kept] = k[:, :, idx], v[:, :, idx]
            self.pos[:kept], self.valid[:, :kept] = pos[idx], valid[:, idx]
            for name in self.names:
                self.ids[name][:, :kept] = ids[name][:, idx]
            self.count, self.contiguous = kept, False
        self.limit = 2 * kept + self.MARGIN

    def _allocate(self, k, v, cap: int) -> None:
        B, Hk = k.shape[:2]
        self.k = k.new_zeros(B, Hk, cap, k.shape[3])
        self.v = v.new_zeros(B, Hk, cap, v.shape[3])
        self.pos = torch.zeros(cap, dtype=torch.long, device=k.device)
        self.valid = torch.zeros(B, cap, dtype=torch.bool, device=k.device)
        self.ids = {n: torch.zeros(B, cap, dtype=torch.long, device=k.device) for n in self.names}

    def _resize(self, cap: int) -> None:
        k, v, pos, valid, ids = self.view()
        self._allocate(k, v, cap)
        c = self.count
        self.k[:, :, :c], self.v[:, :, :c], self.pos[:c], self.valid[:, :c] = k, v, pos, valid
        for name in self.names:
            self.ids[name][:, :c] = ids[name]
