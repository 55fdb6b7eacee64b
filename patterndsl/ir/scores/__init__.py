"""Score terms: how a pair's score changes before the mask (biases, learned tables, soft-capping) and the far
field of near + far softmax. Each term is defined once (its module), against pluggable ops.

- `expr.py`: bias expressions over `i`, `j`, `h` (`Var`, `Const`, `Bin`, `Fn`);
- `alibi.py`: `alibi_slope(h, heads)`; `buckets.py`: `t5_bias(table, ...)` (T5's buckets, as thresholds);
- `softcap.py`: `cap * tanh(s / cap)`; `far.py`: FAVOR+ estimates of the keys outside the mask;
- `score.py`: a stage's terms and their order; `ops.py`: evaluation with torch.
"""
from .alibi import AlibiSlope, slopes  # noqa: F401
from .buckets import MAX_BUCKETS, MAX_DISTANCE, T5Bias  # noqa: F401
from .expr import FUNCS, VARS, Bin, Const, Fn, Neg, Term, Var, uses  # noqa: F401
from .far import Far  # noqa: F401
from .score import Score  # noqa: F401

SCORE_CALLS = ("alibi_slope", "t5_bias")
