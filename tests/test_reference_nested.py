"""Reference causal Luna: the cumulative-sum form equals the equations evaluated token by token."""
import math

import pytest
import torch

from helpers import assert_close
from patterndsl.backends.reference.nested import nested_attention

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _equations(q, k, v, p, c, kpm):
    """docs/language.md §5.3, one (batch, head, t) at a time; softplus with beta = ln 2 is log2(1 + 2^x)."""
    B, H, N, D = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(N):
                js = [j for j in range(t + 1) if not kpm[b, j]]
                if not js:
                    continue
                x = c[b, h, js] @ p[b, h].T / math.sqrt(D)                 # [n_t, l]
                a = torch.log2(1 + torch.exp2(x))
                logits = sum((q[b, h, t] @ k[b, h, j]) / math.sqrt(D) * a[r] for r, j in enumerate(js)) / len(js)
                attn = torch.softmax(logits, dim=0)
                out[b, h, t] = sum((attn @ a[r]) * v[b, h, j] for r, j in enumerate(js)) / len(js)
    return out


def _inputs(B, H, N, D, L, seed):
    return (_rand(B, H, N, D, seed=seed), _rand(B, H, N, D, seed=seed + 1), _rand(B, H, N, D + 1, seed=seed + 2),
            _rand(B, H, L, D, seed=seed + 3), _rand(B, H, N, D, seed=seed + 4))


def test_matches_equations_B2_H2_N12_D4_L3():
    q, k, v, p, c = _inputs(2, 2, 12, 4, 3, seed=0)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[0, :2] = kpm[1, 5] = kpm[1, -3:] = True
    got = nested_attention(q, k, v, p, c, key_padding_mask=kpm)
    assert_close("out", got, _equations(q, k, v, p, c, kpm), atol=1e-12)
    no_pad = nested_attention(q, k, v, p, c)
    assert_close("out without padding", no_pad, _equations(q, k, v, p, c, torch.zeros_like(kpm)), atol=1e-12)


def test_padding_equals_removing_the_keys():
    q, k, v, p, c = _inputs(1, 2, 10, 4, 3, seed=5)
    keep = torch.tensor([0, 1, 3, 4, 6, 7, 8, 9])
    kpm = torch.ones(1, 10, dtype=torch.bool)
    kpm[0, keep] = False
    full = nested_attention(q, k, v, p, c, key_padding_mask=kpm)
    short = nested_attention(*(t[:, :, keep] for t in (q, k, v)), p, c[:, :, keep])
    assert_close("kept rows", full[:, :, keep], short, atol=1e-12)
    assert torch.equal(nested_attention(q, k, v, p, c, torch.ones(1, 10, dtype=torch.bool)),
                       torch.zeros(1, 2, 10, 5, dtype=F64))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_low_precision_B1_H2_N16_D8_L4(dtype, tol):
    q, k, v, p, c = _inputs(1, 2, 16, 8, 4, seed=10)
    gold = nested_attention(q, k, v, p, c)
    out = nested_attention(*(t.to(dtype) for t in (q, k, v, p, c)))
    assert out.dtype == dtype
    assert_close("out", out, gold, atol=tol)


def test_gradcheck_B1_H2_N6_D3_L2():
    args = tuple(t.requires_grad_() for t in _inputs(1, 2, 6, 3, 2, seed=15))
    kpm = torch.zeros(1, 6, dtype=torch.bool)
    kpm[0, 1] = True
    assert torch.autograd.gradcheck(lambda *a: nested_attention(*a, key_padding_mask=kpm), args)


def test_rectangular_calls_are_rows_at_their_positions():
    """Rows at positions q_offset + r: the keys past the last query are never read, missing keys are padding."""
    q, k, v, p, c = _inputs(1, 2, 9, 4, 2, seed=20)
    full = nested_attention(q, k, v, p, c)
    assert_close("first rows", nested_attention(q[:, :, :4], k, v, p, c), full[:, :, :4], atol=1e-13)
    assert_close("offset rows", nested_attention(q[:, :, 3:7], k, v, p, c, q_offset=3), full[:, :, 3:7], atol=1e-13)
    short = nested_attention(q[:, :, 5:], k[:, :, :7], v[:, :, :7], p, c[:, :, :7], q_offset=5)
    kpm = torch.zeros(1, 9, dtype=torch.bool)
    kpm[0, 7:] = True
    assert_close("missing keys", short, nested_attention(q, k, v, p, c, kpm)[:, :, 5:], atol=1e-13)
