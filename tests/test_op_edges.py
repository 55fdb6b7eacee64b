"""Edge values that pass the language's checks must not fail later: scales the compute dtype cannot hold and
feature counts too large to allocate are refused with a clear error, never NaN, silent uniform weights or an
allocation failure."""
import pytest
import torch

import patterndsl as pd
from patterndsl.errors import PatternError


def _scaled(scale):
    return pd.compile(pd.parse(f"pattern p() {{ attend softmax over sliding(2), scale = {scale} }}"))


@pytest.mark.parametrize("scale, becomes", [("1e300", "inf"), ("1e-300", "0")])
def test_scale_beyond_float32_is_refused_at_the_call(scale, becomes):
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    with pytest.raises(PatternError, match=f"not representable in torch.float32 \\(it would become {becomes}\\)"):
        _scaled(scale)(q, k, v)


def test_scale_beyond_float32_runs_in_float64():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64) for _ in range(3))
    out = _scaled("1e300")(q, k, v)   # near-argmax attention, representable in float64
    assert torch.isfinite(out).all()
    scores = (q @ k.transpose(-1, -2))[0, 0]
    allowed = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= 2
    best = scores.masked_fill(~allowed, float("-inf")).argmax(-1)
    torch.testing.assert_close(out[0, 0], v[0, 0, best], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fmap", ["favor", "relu"])
def test_feature_count_is_bounded(fmap):
    with pytest.raises(PatternError, match="features = 100000 is too many \\(at most 65536\\)") as e:
        pd.parse(f"pattern p() {{ attend linear({fmap}(100000)) }}")
    assert "^" in str(e.value)
    pd.parse(f"pattern p() {{ attend linear({fmap}(65536)) }}")


def test_half_precision_inputs_are_scored_in_float32():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float16) for _ in range(3))
    out = _scaled("1e5")(q, k, v)          # beyond float16's range, inside float32's: allowed
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
