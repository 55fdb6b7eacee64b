"""Looking at an op without running it: its dense mask, closed-form tile layout, plan, generated Triton source
and FlexAttention export, at absolute query positions (`q_offset`)."""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir.dense import dense_mask
from ..ir.program import Stage

MAX_DENSE_PAIRS = 1 << 32  # op.mask: 4 GiB of bool


def _count(name: str, n, allow_none: bool = False) -> None:
    if n is None and allow_none:
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise PatternError(f"{name} must be an int >= 0, got {n!r}")


class InspectionMixin:
    """`AttentionOp`'s views of its pattern: `mask`, `block_layout`, `explain`, `emit`, `to_flex`."""

    def _mask_stage(self, stage: str | None) -> Stage:
        if stage is not None:
            try:
                return self.ir.stage(stage)
            except KeyError:
                raise PatternError(f"no stage '{stage}' in {self.name}",
                                   hint=f"stages: {', '.join(s.name for s in self.ir.stages)}") from None
        return self.ir.stage(self.ir.outputs[0])

    def mask(self, n_q: int, n_k: int | None = None, stage: str | None = None, runtime: dict | None = None,
             device=None, q_offset: int = 0) -> torch.Tensor:
        """The exact dense bool mask `[n_q, n_k]` (True = allowed) of a stage (default: the first output), with
        query row r at position `q_offset + r` (rows o .. o + n_q - 1 of the mask of o + n_q queries).

        Per-head programs give `[H, n_q, n_k]`, one mask per head; `runtime` supplies ids for `same(...)`.
        """
        _count("n_q", n_q)
        _count("n_k", n_k, allow_none=True)
        _count("q_offset", q_offset)
        from .validate import MAX_POSITION
        if q_offset + n_q > MAX_POSITION or (n_k or 0) > MAX_POSITION:
            raise PatternError(f"positions must stay below 2^31: q_offset {q_offset} + n_q {n_q}, n_k {n_k}")
        if n_q * (n_q if n_k is None else n_k) > MAX_DENSE_PAIRS:
            raise PatternError(f"op.mask builds a dense [n_q, n_k] bool tensor: at most {MAX_DENSE_PAIRS} pairs, got "
                               f"{n_q} x {n_q if n_k is None else n_k}",
                               hint="op.block_layout(n) classifies tiles in closed form at any length")
        if self.ir.by_heads and stage is None:
            per = [dense_mask(self.ir.stage(o).mask, n_q, n_k, runtime, device, q_offset) for o in self.ir.outputs]
            reps = [self.ir.stage(o).heads[1] - self.ir.stage(o).heads[0] for o in self.ir.outputs]
            return torch.cat([m.unsqueeze(-3).expand(*m.shape[:-2], r, *m.shape[-2:])
                              for m, r in zip(per, reps)], dim=-3)
        return dense_mask(self._mask_stage(stage).mask, n_q, n_k, runtime, device, q_offset)

    def block_layout(self, n_q: int, n_k: int | None = None, block: tuple[int, int] = (64, 64),
                     stage: str | None = None, q_offset: int = 0) -> torch.Tensor:
        """The closed-form tile classes `[ceil(n_q/BM), ceil(n_k/BN)]` int8 (0 empty, 1 partial, 2 full)."""
        from ..plan.layout import block_layout
        _count("q_offset", q_offset)
        return block_layout(self._mask_stage(stage).mask, n_q, n_q if n_k is None else n_k, *block, q_offset=q_offset)

    def properties(self, bound: int = 1024, block: int = 64):
        """What the pattern guarantees, for every N where the closed forms decide it (`patterndsl.analysis`):
        future keys per stage and through the dataflow, rows with no key, allowed pairs and tiles in N."""
        from ..analysis.checks import program_properties
        return program_properties(self.ir, bound, block)

    def explain(self, seq_len: int, head_dim: int = 64, device="cpu", dtype=torch.float32, batch: int = 1,
                heads: int | None = None, grad: bool = False, kv_heads: int | None = None, q_offset: int = 0):
        """The `Plan` for these shapes: per stage every candidate lowering with its predicted time, the chosen
        one and why, heads and mask, tiles, symbolic costs, and the N from which it beats dense attention."""
        from ..backends import declare_all
        from ..plan.plan import make_plan
        declare_all()
        return make_plan(self, seq_len=seq_len, head_dim=head_dim, device=torch.device(device), dtype=dtype,
                         batch=batch, heads=heads, grad=grad, kv_heads=kv_heads, q_offset=q_offset)

    def emit(self, **constexprs) -> str:
        """The Triton source generated for this program: its mask functions (`mask_tile_*`, `tile_full_*`),
        which the block-sparse kernels of `backends/triton` inline on partial tiles (full tiles skip them)."""
        from ..backends.triton.codegen import emit_program
        return emit_program(self.ir, **constexprs)

    def to_flex(self, stage: str | None = None, *, n_q: int | None = None, n_k: int | None = None,
                runtime: dict | None = None, device=None, q_offset: int = 0, score_mod: bool = False,
                tables: dict | None = None):
        """A FlexAttention `mask_mod(b, h, q_idx, kv_idx)` computing the same mask as
        `op.mask(n_q, n_k, q_offset=q_offset)`; `random(...)` masks need the lengths, `same(...)` masks the
        runtime ids (`export.flex.to_flex`); `score_mod=True` returns `(mask_mod, score_mod)` (score terms)."""
        from ..export.flex import to_flex
        return to_flex(self, stage, n_q=n_q, n_k=n_k, runtime=runtime, device=device, q_offset=q_offset,
                       score_mod=score_mod, tables=tables)
