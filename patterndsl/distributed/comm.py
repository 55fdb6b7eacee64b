"""Communication over a `torch.distributed` group, with the bytes this rank sends counted.

Only what gloo and NCCL both support is used: batched point-to-point sends and receives
(`batch_isend_irecv`), `all_reduce` (sum, max) and `all_gather` of equal-shaped tensors. Bytes are counted as
the payload this rank hands to the network: exact for point-to-point; for collectives as a ring algorithm
sends them (`all_gather`: its piece to each of the W - 1 others; `all_reduce`: 2 (W - 1) / W of the tensor).

`merge` is the log-sum-exp merge of row pieces, safe where a row has no key in any piece (out 0, lse -inf,
and zero gradients, never NaN).
"""
from __future__ import annotations

import torch

from ..errors import PatternError

NEG_INF = float("-inf")


class Comm:
    """A process group (default: the world), this rank's place in it, and the bytes it has sent per phase."""

    def __init__(self, group=None):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise PatternError("patterndsl.distributed needs an initialised process group",
                               hint="call torch.distributed.init_process_group(...) first (gloo on CPUs, nccl on GPUs)")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.sent: dict[str, int] = {}
        self.phase = "forward"
        self._joined = False

    def count(self, nbytes: float) -> None:
        self.sent[self.phase] = self.sent.get(self.phase, 0) + int(nbytes)

    def _peer(self, r: int) -> int:
        return r if self.group is None else self.dist.get_global_rank(self.group, r)

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, tuple], device) -> dict[int, torch.Tensor]:
        """Send `sends[dst]` to each dst and receive a tensor `recvs[src]` = (shape, dtype, device) from each src,
        all at once; empty tensors are not sent (both sides know the sizes). Every rank calls it, even with
        nothing to send: the first call makes one uncounted all-reduce, so that the group's communicators
        exist before any rank posts point-to-point operations (NCCL asks for this)."""
        if not self._joined:
            self.dist.all_reduce(torch.zeros(1, device=device), group=self.group)
            self._joined = True
        ops, got = [], {}
        for src, (shape, dtype, device) in sorted(recvs.items()):
            got[src] = torch.empty(shape, dtype=dtype, device=device)
            if got[src].numel():
                ops.append(self.dist.P2POp(self.dist.irecv, got[src], self._peer(src), self.group))
        for dst, t in sorted(sends.items()):
            t = t.contiguous()
            if t.numel():
                ops.append(self.dist.P2POp(self.dist.isend, t, self._peer(dst), self.group))
                self.count(t.numel() * t.element_size())
        if ops:
            for req in self.dist.batch_isend_irecv(ops):
                req.wait()
        return got

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (or max) over ranks of `x`, as a new tensor."""
        out = x.detach().clone().contiguous()
        if self.world_size > 1 and out.numel():
            red = self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.MAX
            self.dist.all_reduce(out, op=red, group=self.group)
            self.count(2 * (self.world_size - 1) / self.world_size * out.numel() * out.element_size())
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` (equal shapes), stacked: `[W, *x.shape]`."""
        x = x.detach().contiguous()
        if self.world_size == 1:
            return x[None].clone()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        if x.numel():
            self.dist.all_gather(parts, x, group=self.group)
            self.count((self.world_size - 1) * x.numel() * x.element_size())
        return torch.stack(parts)


def merge(out: torch.Tensor, lse: torch.Tensor, dim: int):
    """Merge row pieces along `dim` of `lse` (out has one more trailing dim): (out, lse) of the whole rows."""
    top = lse.amax(dim, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)
    total = w.sum(dim, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    merged = (w.unsqueeze(-1) * out).sum(dim) / safe.squeeze(dim).unsqueeze(-1)
    lse_all = torch.where(total > 0, top + torch.log(safe), torch.full_like(total, NEG_INF)).squeeze(dim)
    return merged.to(out.dtype), lse_all


def merge_pieces(pieces: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor, dv: int):
    """Merge a list of (out, lse) pieces of the same rows; no piece: out 0, lse -inf (of `like`'s rows)."""
    if not pieces:
        shape = (*like.shape[:3],)
        return like.new_zeros(*shape, dv), torch.full(shape, NEG_INF, dtype=_lse_dtype(like), device=like.device)
    if len(pieces) == 1:
        return pieces[0]
    return merge(torch.stack([o for o, _ in pieces]), torch.stack([lse for _, lse in pieces]), 0)


def _lse_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32
