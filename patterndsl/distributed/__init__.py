"""Context parallelism: a compiled op run with q, k, v sharded along the sequence over `torch.distributed`.

Each rank holds some positions of the sequence (a `Sharding`: contiguous, or zig-zag for causal masks,
chosen from the pattern's tile costs). For softmax stages the closed-form tile layout says which keys each
rank's rows read, so only those are exchanged (a halo for a band, a few tiles for global columns or random
blocks); global rows are split over the ranks' keys and merged by log-sum-exp; linear attention exchanges
its sums or prefix states. See docs/distributed.md.

>>> import patterndsl as pd
>>> from patterndsl.distributed import plan_sharding
>>> sh = plan_sharding(pd.compile("longformer", window=64), 1024, 4)
>>> sh.kind, sh.segments[1]
('contiguous', ((256, 512),))
"""
from __future__ import annotations

from .balance import choose as plan_sharding
from .context import ContextParallel
from .halo import HaloPlan, halo_plan
from .launch import launch
from .region import Region
from .sharding import Sharding, contiguous, zigzag

__all__ = ["ContextParallel", "HaloPlan", "Region", "Sharding", "contiguous", "halo_plan", "launch", "plan_sharding",
           "zigzag"]
