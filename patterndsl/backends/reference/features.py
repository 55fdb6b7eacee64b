"""Random-feature maps of linear attention: the projection draw and the maps phi(x) (docs/language.md §5.2).

>>> import torch
>>> from patterndsl.ir.program import Favor
>>> w = draw_projection(Favor(8), head_dim=4)
>>> w.shape, w.dtype
(torch.Size([8, 4]), torch.float64)
>>> torch.equal(w, draw_projection(Favor(8), 4)), torch.equal(w, draw_projection(Favor(8), 4, draw=1))
(True, False)
>>> x = torch.randn(1, 1, 5, 4, dtype=torch.float64)
>>> bool((favor_features(x, w, is_query=True) > 0).all())
True

FAVOR+ (Choromanski et al. 2021), with `x' = x * d^-1/4` and `u = x' W^T` (`W` is `[m, d]`):
`phi(x) = m^-1/2 (exp(u - |x'|^2 / 2 - c) + eps)`. The stabiliser `c` is, for a query, the max of `u` over
its features; for keys, one max of `u` over all (unpadded) keys and features of a (batch, head). It is not
detached: it is part of the function (through `eps`), so autograd gives that function's exact gradient.
`relu`: `relu(x' W^T) + 1e-3` (performer-pytorch's `generalized_kernel` with `kernel_fn=ReLU`: no m^-1/2).
`elu1`: `elu(x) + 1` (Katharopoulos et al. 2020), no projection and no input scaling.
"""
from __future__ import annotations

import math

import torch

RELU_EPS = 1e-3
_MASK64 = (1 << 64) - 1


def _mix(seed: int, draw: int) -> int:
    """A 63-bit generator seed from (seed, draw): splitmix64 of each, combined (distinct pairs, distinct seeds)."""
    def splitmix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)
    return splitmix(splitmix(int(seed) & _MASK64) ^ int(draw)) >> 1


def _orthogonal_block(d: int, g: torch.Generator) -> torch.Tensor:
    """A `[d, d]` matrix with orthonormal rows, Haar-distributed (QR of a Gaussian, signs fixed by diag(R))."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.T


def draw_projection(fm, head_dim: int, draw: int = 0) -> torch.Tensor:
    """The random projection `W [m, head_dim]` (float64, CPU) of feature map `fm` (Favor or ReluFeatures).

    Orthogonal (`fm.orthogonal`): stacked blocks of `head_dim` orthonormal rows (the last block cut to fit),
    rows scaled by the norms of independent Gaussian vectors (chi(d): `fm.scaling` 0) or by `sqrt(d)`
    (scaling 1). Otherwise i.i.d. Gaussian rows (rescaled to norm `sqrt(d)` for scaling 1). The generator is
    seeded from `(fm.seed, draw)`, `draw` counting redraws, so a projection is reproducible.
    """
    m, d = fm.features, head_dim
    scaling = getattr(fm, "scaling", 0)
    g = torch.Generator().manual_seed(_mix(fm.seed, draw))
    if fm.orthogonal:
        blocks = [_orthogonal_block(d, g) for _ in range(-(-m // d))]
        w = torch.cat(blocks)[:m]
        norms = (torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1) if scaling == 0
                 else torch.full((m,), math.sqrt(d), dtype=torch.float64))
        return w * norms[:, None]
    w = torch.randn(m, d, generator=g, dtype=torch.float64)
    if scaling == 1:
        w = w * (math.sqrt(d) / w.norm(dim=1, keepdim=True))
    return w


def _project(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x' W^T, x') with x' = x * d^-1/4."""
    xs = x * x.shape[-1] ** -0.25
    return torch.matmul(xs, w.to(x.dtype).T), xs


def favor_exponent(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, a) with `u = x' W^T` and `a = u - |x'|^2 / 2` (`[..., N, m]`): phi(x) = m^-1/2 (exp(a - c) + eps)."""
    u, xs = _project(x, w)
    return u, u - (xs * xs).sum(-1, keepdim=True) / 2


def favor_features(x: torch.Tensor, w: torch.Tensor, is_query: bool, eps: float = 1e-4,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ features `[B, H, N, m]` of x `[B, H, N, d]` with projection w `[m, d]` (non-causal stabiliser).

    `valid` (bool `[B, N]`, keys only): padded keys are left out of the key max and get zero features.
    """
    m = w.shape[0]
    u, a = favor_exponent(x, w)
    if is_query:
        c = u.amax(dim=-1, keepdim=True)
        return m ** -0.5 * (torch.exp(a - c) + eps)
    if valid is None:
        c = u.amax(dim=(-1, -2), keepdim=True)
        return m ** -0.5 * (torch.exp(a - c) + eps)
    ok = valid[:, None, :, None]
    c = u.masked_fill(~ok, float("-inf")).amax(dim=(-1, -2), keepdim=True)
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))          # no valid key: any finite value
    phi = m ** -0.5 * (torch.exp(a.masked_fill(~ok, float("-inf")) - c) + eps)
    return phi * ok


def relu_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`relu(x' W^T) + 1e-3` `[B, H, N, m]`."""
    return torch.relu(_project(x, w)[0]) + RELU_EPS


def elu1_features(x: torch.Tensor) -> torch.Tensor:
    """`elu(x) + 1` `[B, H, N, d]`."""
    return torch.nn.functional.elu(x) + 1
