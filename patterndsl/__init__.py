"""patterndsl: a compiler for attention patterns (`.attn` programs to PyTorch ops).

>>> import patterndsl as pd
>>> op = pd.compile("longformer", window=4)
>>> op.mask(6).sum().item()
30
"""
from __future__ import annotations

from . import nn  # noqa: F401  (pd.nn.Attention)
from .analysis import compare, properties, reach
from .api import Program, builtin, builtins, compile, load, parse
from .errors import PatternError
from .op import AttentionOp

__all__ = ["AttentionOp", "PatternError", "Program", "builtin", "builtins", "compare", "compile", "load", "nn", "parse",
           "properties", "reach"]
__version__ = "0.1.0"
