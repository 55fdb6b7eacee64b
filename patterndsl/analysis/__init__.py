"""Reasoning about patterns, not tensors: compare two patterns, prove properties, trace receptive fields.

- `compare(a, b)`: equal, A within B, B within A, or neither, for every N when the closed forms decide it
  (`contain.py`), else checked up to a bound on tile layouts; pairs that tell them apart.
- `properties(program)`: future keys, rows with no key, allowed pairs and tiles as expressions in N.
- `reach(patterns, layers, n)`: which tokens can influence a query after each layer.

The modules import lazily: `import patterndsl` does not load sympy or the analyses.
"""
from __future__ import annotations


def compare(a, b, bound: int = 1024, params_a: dict | None = None, params_b: dict | None = None):
    """See `patterndsl.analysis.comparison.compare`."""
    from .comparison import compare as run
    return run(a, b, bound, params_a, params_b)


def properties(program, bound: int = 1024, block: int = 64, **params):
    """See `patterndsl.analysis.checks.properties`."""
    from .checks import properties as run
    return run(program, bound, block, **params)


def reach(patterns, layers: int | None = None, n: int = 4096, query: int | None = None, residual: bool = True,
          max_depth: int = 4096, runtime: dict | None = None, **params):
    """See `patterndsl.analysis.receptive.reach`."""
    from .receptive import reach as run
    return run(patterns, layers, n, query, residual, max_depth, runtime, **params)
