"""The log-sum-exp the softmax backends return (`return_lse=True`) against the oracle's, and gradients flowing
through it (`d lse_i / d s_ij = p_ij`), on masks of several families, padding, grouped kv heads and offsets.
Merging pieces of a row by log-sum-exp (decode, ring attention) relies on this gradient."""
from __future__ import annotations

import os

import pytest
import torch

import oracles as O
from helpers import assert_close
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
CASES = {  # mask, H_kv, n_q, q_offset, padded keys
    "sliding2-globals": (M.sliding(2) | M.global_({0, 7}), 2, 24, 0, ()),
    "causal-padded": (M.CAUSAL, 2, 24, 0, (3, 20, 21, 22, 23)),
    "blocks-gqa": (M.blocks(5) | M.cols({1}), 1, 24, 0, ()),
    "window-offset": (M.window(4, 0), 2, 6, 18, (2,)),
    "empty-rows": (M.rows({0, 1}) | M.sliding(1) & M.cols({20}), 2, 24, 0, ()),
}


def _backend(name):
    if name == "torch":
        from patterndsl.backends.torch.softmax import softmax_attention
    else:
        from patterndsl.backends.triton.softmax import softmax_attention
    return softmax_attention


def _grads(fn, q, k, v, seed=3):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    finite = torch.isfinite(lse)
    w_out, w_lse = (torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (out, lse))
    loss = (out.double() * w_out).sum() + (torch.where(finite, lse, torch.zeros_like(lse)).double() * w_lse).sum()
    loss.backward()
    return out.detach(), lse.detach(), [x.grad for x in leaves]


PARAMS = [pytest.param("torch", c, id=f"torch-{n}") for n, c in CASES.items()] + [
    pytest.param("triton", (CASES[n][0], 4) + CASES[n][2:], id=f"triton-{n}-Hkv4",   # the kernel takes H_kv = H
                 marks=pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1"))
    for n in ("causal-padded", "sliding2-globals")]


@pytest.mark.parametrize("backend,case", PARAMS)
def test_lse_and_its_gradient_equal_the_oracle(backend, case):
    mask, h_kv, n_q, offset, padded = case
    g = torch.Generator().manual_seed(0)
    B, H, NK, D = 2, 4, 24, 16
    q = torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, h_kv, NK, D, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = None
    if padded:
        kpm = torch.zeros(B, NK, dtype=torch.bool)
        kpm[1, list(padded)] = True
    allowed = dense_mask(mask, n_q, NK, q_offset=offset)
    scale = 0.3
    fast = _backend(backend)
    kw = dict(q_offset=offset) if offset else {}
    if backend == "triton":          # float32 kernels: float32 leaves, the oracle on their float64 values
        q, k, v = q.float(), k.float(), v.float()
    got = _grads(lambda a, b, c: fast(a, b, c, mask, scale=scale, key_padding_mask=kpm, return_lse=True, **kw),
                 q, k, v)
    want = _grads(lambda a, b, c: O.softmax_attention(a.double(), b.double(), c.double(), allowed, scale, kpm,
                                                      return_lse=True), q, k, v)
    tol = 1e-10 if backend == "torch" else 1e-5
    assert_close("out", got[0].double(), want[0], atol=tol, rtol=tol)
    assert_close("lse", got[1].double(), want[1], atol=tol, rtol=tol)
    for name, a, b in zip(("dq", "dk", "dv"), got[2], want[2]):
        assert_close(name, a.double(), b.double(), atol=10 * tol, rtol=10 * tol)
