"""The op: a compiled program you call on tensors. `attention.py` holds `AttentionOp`; a call is checked once
(`validate.py`) and its stage graph runs on the backends (`graph.py`); `projections.py` draws the random
features of linear stages; `inspect.py` shows masks, layouts, plans, Triton source and Flex exports.

>>> import torch, patterndsl as pd
>>> op = pd.compile("sliding_window", window=3, backend="reference")
>>> q = torch.randn(1, 4, 1, 8); k = v = torch.randn(1, 2, 6, 8)    # one query at position 5, 2 kv heads
>>> op(q, k, v, q_offset=5).shape
torch.Size([1, 4, 1, 8])
"""
from .attention import OP_OPTIONS, AttentionOp
from .inspect import MAX_DENSE_PAIRS
from .validate import NESTED_KEYS

__all__ = ["AttentionOp", "MAX_DENSE_PAIRS", "NESTED_KEYS", "OP_OPTIONS"]
