"""Shardings: which token positions each rank holds, as ascending segments (contiguous, zig-zag, or given).

A rank's local tensors are its segments' rows in ascending order (`positions(rank)`). Boundaries fall on
multiples of an alignment (64 positions, halved while a chunk would hold fewer than eight), so halos and key
buffers start on tile edges; the last chunk takes the remainder, so any length works.

>>> s = contiguous(10, 2, align=1)
>>> s.segments, s.sizes
((((0, 5),), ((5, 10),)), (5, 5))
>>> z = zigzag(16, 2, align=1)
>>> z.segments, z.positions(1).tolist()
((((0, 4), (12, 16)), ((4, 12),)), [4, 5, 6, 7, 8, 9, 10, 11])
>>> z.owner(13), z.local_index(13)
(0, 5)
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..errors import PatternError

ALIGN = 64


@dataclass(frozen=True)
class Sharding:
    """Per rank, its ascending, disjoint segments `(start, stop)`; together they cover `[0, seq_len)`."""
    seq_len: int
    segments: tuple[tuple[tuple[int, int], ...], ...]
    kind: str = "custom"

    def __post_init__(self):
        spans = sorted(s for segs in self.segments for s in segs if s[1] > s[0])
        at = 0
        for a, b in spans:
            if a != at:
                raise PatternError(f"a sharding must cover positions 0 .. {self.seq_len - 1} once: "
                                   f"{'gap' if a > at else 'overlap'} at position {min(a, at)}")
            at = b
        if at != self.seq_len:
            raise PatternError(f"a sharding must cover positions 0 .. {self.seq_len - 1}, it stops at {at}")
        for r, segs in enumerate(self.segments):
            if list(segs) != sorted(segs):
                raise PatternError(f"rank {r}'s segments must be ascending, got {segs}")

    @property
    def world_size(self) -> int:
        return len(self.segments)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Tokens per rank."""
        return tuple(sum(b - a for a, b in segs) for segs in self.segments)

    def positions(self, rank: int) -> torch.Tensor:
        """The absolute positions of rank `rank`'s rows, in local order (LongTensor)."""
        parts = [torch.arange(a, b) for a, b in self.segments[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def offsets(self, rank: int) -> tuple[int, ...]:
        """The local row where each of the rank's segments starts."""
        out, at = [], 0
        for a, b in self.segments[rank]:
            out.append(at)
            at += b - a
        return tuple(out)

    def owner(self, pos: int) -> int:
        """The rank holding absolute position `pos`."""
        return self._table()[1][bisect.bisect_right(self._table()[0], pos) - 1]

    def local_index(self, pos: int) -> int:
        """The local row of absolute position `pos` on its owner."""
        starts, owners, locals_ = self._table()
        k = bisect.bisect_right(starts, pos) - 1
        return locals_[k] + pos - starts[k]

    def pieces(self, lo: int, hi: int):
        """`[lo, hi)` cut at owner boundaries: (owner, abs_lo, abs_hi, local_lo) in ascending order."""
        starts, owners, locals_ = self._table()
        out, at = [], lo
        while at < hi:
            k = bisect.bisect_right(starts, at) - 1
            end = min(hi, starts[k + 1] if k + 1 < len(starts) else self.seq_len)
            out.append((owners[k], at, end, locals_[k] + at - starts[k]))
            at = end
        return out

    def _table(self):
        if "_t" not in self.__dict__:
            rows = sorted((a, r, off) for r in range(self.world_size)
                          for (a, b), off in zip(self.segments[r], self.offsets(r)) if b > a)
            object.__setattr__(self, "_t", ([a for a, _, _ in rows], [r for _, r, _ in rows],
                                            [o for _, _, o in rows]))
        return self.__dict__["_t"]

    # ---------------------------------------------------------------------------------------- tensors
    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank `rank`'s rows of a full tensor `x` (sequence along `dim`; 2 for `[B, H, N, D]`)."""
        if x.shape[dim] != self.seq_len:
            raise PatternError(f"sharding a sequence of {self.seq_len}, but the tensor has {x.shape[dim]} along "
                               f"dim {dim} (shape [{', '.join(map(str, x.shape))}])")
        return torch.cat([x.narrow(dim, a, b - a) for a, b in self.segments[rank]] or [x.narrow(dim, 0, 0)], dim)

    def unshard(self, parts, dim: int = 2) -> torch.Tensor:
        """The full tensor from every rank's shard (`parts[rank]`), rows back in position order."""
        pieces = []
        for r, part in enumerate(parts):
            for (a, b), off in zip(self.segments[r], self.offsets(r)):
                pieces.append((a, part.narrow(dim, off, b - a)))
        return torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])], dim)

    def __str__(self) -> str:
        segs = "; ".join(f"rank {r}: " + ", ".join(f"[{a}, {b})" for a, b in s) for r, s in enumerate(self.segments))
        return f"{self.kind} sharding of {self.seq_len} tokens over {self.world_size} ranks ({segs})"


def _alignment(n: int, chunks: int, align: int) -> int:
    while align > 1 and n < 8 * align * chunks:       # boundaries move a chunk by at most 1/8
        align //= 2
    return max(align, 1)


def _bounds(n: int, chunks: int, align: int) -> list[int]:
    a = _alignment(n, chunks, align)
    return [0] + [min(n, (c * n // chunks) // a * a) for c in range(1, chunks)] + [n]


def _check(n: int, world_size: int) -> None:
    for name, x in (("seq_len", n), ("world_size", world_size)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise PatternError(f"{name} must be an int >= 1, got {x!r}")


def contiguous(n: int, world_size: int, align: int = ALIGN) -> Sharding:
    """Rank r holds the r-th of `world_size` equal runs (the last one takes the remainder)."""
    _check(n, world_size)
    b = _bounds(n, world_size, align)
    return Sharding(n, tuple(((b[r], b[r + 1]),) for r in range(world_size)), "contiguous")


def zigzag(n: int, world_size: int, align: int = ALIGN) -> Sharding:
    """`2 * world_size` equal chunks; rank r holds chunks r and `2 * world_size - 1 - r`, so under a causal
    mask every rank holds one cheap and one dear chunk."""
    _check(n, world_size)
    b = _bounds(n, 2 * world_size, align)
    segs = tuple(_joined([(b[r], b[r + 1]), (b[2 * world_size - 1 - r], b[2 * world_size - r])])
                 for r in range(world_size))
    return Sharding(n, segs, "zigzag")


def _joined(segs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Ascending segments with touching ones joined and empty ones dropped (one empty kept if all are)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in segs if s[1] > s[0]):
        out[-1:] = [(out[-1][0], b)] if out and out[-1][1] == a else out[-1:] + [(a, b)]
    return tuple(out) or ((segs[0][0], segs[0][0]),)
