"""Statistics: FAVOR+ estimates softmax attention, and its mean error falls as the number of features grows."""
import torch

import patterndsl as pd

FEATURES = (8, 32, 128, 512)
DRAWS = 8


def _mean_error(m: int, q, k, v, exact) -> float:
    errs = []
    for seed in range(DRAWS):
        out = pd.compile("performer", features=m, seed=seed, backend="reference")(q, k, v)
        errs.append((out - exact).abs().mean().item())
    return sum(errs) / len(errs)


def test_error_falls_with_features_B1_H4_N64_D16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(1, 4, 64, 16, generator=g, dtype=torch.float64) for _ in range(3))
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
    errors = [_mean_error(m, q, k, v, exact) for m in FEATURES]
    # Monte Carlo: error ~ m^-1/2, so each 4x more features should roughly halve it
    for small, large in zip(errors, errors[1:]):
        assert large < 0.8 * small, errors
    assert errors[-1] < 0.3 * errors[0], errors
    assert errors[-1] < 0.01, errors
