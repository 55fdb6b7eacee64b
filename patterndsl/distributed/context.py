"""`ContextParallel`: a compiled op run with q, k, v sharded along the sequence over a process group.

Values of the program are either sharded (the inputs, and stages whose queries are sharded: each rank holds
its rows) or replicated (learned params such as Luna's `p`, and stages whose queries are replicated). Each
stage runs by the kinds of its queries and keys:

| stage | queries, keys | how |
|---|---|---|
| softmax | sharded, sharded | halo exchange from the layout (and `same(...)`'s ids), global rows split |
| softmax | replicated, sharded | each rank against its keys, merged by log-sum-exp (Luna's pack) |
| softmax | sharded, replicated | local (Luna's unpack) |
| linear | any, sharded | all-reduced sums, or (causal, sharded queries) a scan of prefix states (`linear.py`) |
| linear | any, replicated | local (not causal) |
| nested | sharded, sharded | prefix sums from the segments before (`nested.py`) |
"""
from __future__ import annotations

import torch

from ..errors import PatternError
from ..ir import mask as M
from ..ir.program import Linear, Softmax
from ..op.graph import stage_sources
from ..op.validate import check_call
from .balance import choose, stage_kinds
from .comm import Comm
from .halo import halo_plan
from .linear import sharded_linear
from .nested import sharded_nested
from .sharding import Sharding
from .softmax import local_softmax, sharded_softmax, split_softmax


class ContextParallel:
    """Call as the op, with this rank's shards: `cp(q, k, v, key_padding_mask=None, **inputs)`.

    q, k `[B, H, n, D]`, v `[B, H, n, D_v]` and `key_padding_mask` `[B, n]` hold this rank's n positions
    (`cp.positions`, in order; `cp.shard(x)` cuts them from a full tensor); learned params (Luna's `p`) are
    passed whole on every rank. Returns this rank's rows of each sharded output and the whole of each
    replicated one (Luna: `(out rows, packed)`). Gradients: the sharded inputs get their rows of the
    single-process gradient (of the sum of every rank's loss); a replicated input gets this rank's part,
    to be summed over ranks as the model's other parameter gradients are.
    """

    def __init__(self, op, seq_len: int, group=None, sharding="auto"):
        from ..api import compile as compile_op
        self.op = op if hasattr(op, "ir") else compile_op(op)
        self.comm = Comm(group)
        self.sharding: Sharding = choose(self.op, seq_len, self.comm.world_size, sharding)
        self.seq_len = seq_len
        kinds = stage_kinds(self.op.ir)
        for st in self.op.ir.stages:
            sharded_softmax_stage = isinstance(st.normaliser, Softmax) and kinds[st.name] == (True, True)
            if M.runtime_inputs(st.mask) and not sharded_softmax_stage:
                raise PatternError(f"patterndsl.distributed: stage {st.name} reads runtime ids "
                                   f"({', '.join(M.runtime_inputs(st.mask))}) over replicated queries or keys",
                                   hint="same(...) masks run in softmax stages over the sharded sequence")

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def positions(self) -> torch.Tensor:
        """The absolute positions of this rank's rows, in local order."""
        return self.sharding.positions(self.rank)

    @property
    def bytes_sent(self) -> dict[str, int]:
        """Bytes this rank has sent so far, by phase ("forward", "backward")."""
        return dict(self.comm.sent)

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's rows of a full tensor (sequence along `dim`)."""
        return self.sharding.shard(x, self.rank, dim)

    def gather(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The full tensor from every rank's rows (for looking and testing; not differentiable)."""
        sizes = self.sharding.sizes
        most = max(sizes)
        pad = list(x.shape)
        pad[dim] = most - x.shape[dim]
        every = self.comm.all_gather(torch.cat([x.detach(), x.new_zeros(pad)], dim))
        return self.sharding.unshard([every[r].narrow(dim, 0, sizes[r]) for r in range(len(sizes))], dim)

    # -------------------------------------------------------------------------------------------- running
    def __call__(self, q, k, v, key_padding_mask=None, **inputs):
        op = self.op
        self._check(q, k, v, key_padding_mask, inputs)
        call = check_call(op.ir, q, k, v, key_padding_mask, 0, inputs)     # the op's checks, on this rank's shard
        values = dict(call.params)
        kinds, ids = stage_kinds(op.ir), self._whole_ids(inputs)
        for st in op.ir.stages:
            qs, ks, vs, kpm, c, p, _ = stage_sources(st, call, values)    # heads sliced, kv heads of each group
            values[st.name] = self._stage(st, kinds[st.name], qs, ks, vs, kpm, p, c, ids)
        if op.ir.by_heads:
            return torch.cat([values[o] for o in op.ir.outputs], dim=1)
        outs = tuple(values[o] for o in op.ir.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _stage(self, st, kinds, q, k, v, kpm, p, c, ids):
        comm, sh, norm = self.comm, self.sharding, st.normaliser
        if isinstance(norm, Softmax):
            scale = norm.scale if norm.scale is not None else q.shape[-1] ** -0.5
            if kinds == (True, True):
                runtime = {n: ids[n] for n in M.runtime_inputs(st.mask)} or None
                return sharded_softmax(comm, halo_plan(st.mask, sh, runtime=runtime), q, k, v, kpm, scale, runtime)
            if kinds == (False, True):
                return split_softmax(comm, sh, st.mask, q, k, v, kpm, scale)
            if kinds == (True, False):
                return local_softmax(sh, comm.rank, st.mask, q, k, v, scale)
            from ..backends.torch.softmax import softmax_attention
            return softmax_attention(q, k, v, st.mask, scale=scale)
        if isinstance(norm, Linear) and not st.causal:
            w = self.op.projection(st, q.shape[-1], q.device, q.dtype)
            if kinds[1]:                  # sharded keys: their sums are all-reduced
                return sharded_linear(comm, sh, norm.feature_map, w, q, k, v, kpm, causal=False)
            from ..backends.torch.linear_scan import linear_attention
            return linear_attention(q, k, v, norm.feature_map, w, causal=False, chunk=q.shape[2] or 1)
        if kinds != (True, True):
            what = "causal linear" if isinstance(norm, Linear) else "nested"
            raise PatternError(f"patterndsl.distributed runs {what} stages over sharded queries and keys only; "
                               f"stage {st.name} has replicated {'queries' if not kinds[0] else 'keys'}")
        if isinstance(norm, Linear):
            w = self.op.projection(st, q.shape[-1], q.device, q.dtype)
            return sharded_linear(comm, sh, norm.feature_map, w, q, k, v, kpm, causal=True)
        return sharded_nested(comm, sh, q, k, v, p, c, kpm)

    def _whole_ids(self, inputs) -> dict:
        """The runtime ids of `same(...)` masks for the whole sequence, all-gathered from every rank's shard."""
        out = {}
        for name in sorted({n for st in self.op.ir.stages for n in M.runtime_inputs(st.mask)}):
            if isinstance(inputs[name], (tuple, list)):
                raise PatternError(f"{name}: pass this rank's ids [B, n] (one tensor, for queries and keys alike), "
                                   "not a (query ids, key ids) pair")
            self.comm.phase = "forward"
            out[name] = self.gather(inputs[name], dim=1)
        return out

    def _check(self, q, k, v, kpm, inputs) -> None:
        n = self.sharding.sizes[self.rank]
        c = inputs.get("c")
        if "c" in self.op.input_names() and isinstance(k, torch.Tensor) and (
                not isinstance(c, torch.Tensor) or c.shape != k.shape or c.dtype != k.dtype):
            got = f"{c.dtype} [{', '.join(map(str, c.shape))}]" if isinstance(c, torch.Tensor) else type(c).__name__
            raise PatternError(f"c (pack keys) must be this rank's shard, like k: {k.dtype} "
                               f"[{', '.join(map(str, k.shape))}], got {got}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] != n:
                raise PatternError(f"rank {self.rank} holds {n} of the {self.seq_len} positions, but {name} has "
                                   f"{t.shape[2]} rows (shape [{', '.join(map(str, t.shape))}])",
                                   hint="pass this rank's shard: cp.shard(x) cuts it from the full tensor")
        if isinstance(kpm, torch.Tensor) and kpm.dim() == 2 and kpm.shape[1] != n:
            raise PatternError(f"key_padding_mask must be this rank's [B, {n}] shard, got "
                               f"[{', '.join(map(str, kpm.shape))}]", hint="cp.shard(mask, dim=1)")
