"""Dependence is the contract, at the op and in every backend: a NaN or Inf in a padded key (k, v, or causal
Luna's pack keys c) changes no output and no gradient, forward and backward, for softmax, linear and nested
stages alike. Each case poisons the padded positions and compares with a run whose padded positions hold other
(finite) values: padding means the op must not look there, so both runs must agree exactly, and the gradients
of the padded positions must be exactly 0. (`test_reference_isolation.py` checks the reference's functions;
this file checks what a user calls.)"""
import os

import pytest
import torch

import patterndsl as pd
from helpers import assert_close

N, D, L = 20, 8, 3
PROGRAMS = {  # case id: (built-in, options)
    "performer": ("performer", dict(features=8)),
    "performer_causal": ("performer", dict(features=8, causal=True)),
    "performer_relu": ("performer", dict(features=8, kernel="relu")),
    "luna": ("luna", dict(length=L)),
    "luna_causal": ("luna_causal", dict(length=L)),
    "longformer": ("longformer", dict(window=2)),
    "longformer_performer": ("longformer_performer", dict(window=2, num_heads=2, local_heads=1, features=8)),
}
BACKENDS = ["reference", "torch"]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    BACKENDS.append("triton")
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _padding():
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[0, 13:] = True   # a padded tail
    pad[1, 4] = True     # and a hole
    return pad


def _inputs(name, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, N, D, generator=g, dtype=dtype) for _ in range(3))
    extra = {}
    if name.startswith("luna"):
        extra["p"] = torch.randn(L, D, generator=g, dtype=dtype)
    if name == "luna_causal":
        extra["c"] = torch.randn(2, 2, N, D, generator=g, dtype=dtype)
    return q, k, v, extra


def _run(op, q, k, v, extra, pad):
    leaves = {"q": q, "k": k, "v": v, **extra}
    leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    out = op(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=pad,
             **{n: t for n, t in leaves.items() if n not in "qkv"})
    outs = out if isinstance(out, tuple) else (out,)  # luna returns (output, packed context)
    sum((o * torch.linspace(1, 2, o.shape[-1], dtype=o.dtype)).sum() for o in outs).backward()
    return [o.detach() for o in outs], {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_padded_keys_reach_nothing(name, backend, poison):
    dtype = torch.float32 if backend == "triton" else torch.float64
    program, options = PROGRAMS[name]
    op = pd.compile(program, backend=backend, **options)
    q, k, v, extra = _inputs(name, 0, dtype)
    pad = _padding()
    where = pad[:, None, :, None]
    other = {n: t.masked_fill(where, 3.0) for n, t in {"k": k, "v": v, **extra}.items() if n != "p"}
    bad = {n: t.masked_fill(where, POISONS[poison]) for n, t in other.items()}
    keep = {n: t for n, t in extra.items() if n == "p"}
    out_a, grads_a = _run(op, q, other["k"], other["v"], {**keep, **{n: other[n] for n in other if n == "c"}}, pad)
    out_b, grads_b = _run(op, q, bad["k"], bad["v"], {**keep, **{n: bad[n] for n in bad if n == "c"}}, pad)
    for idx, (b, a) in enumerate(zip(out_b, out_a)):
        assert_close(f"output {idx}", b, a)
    for n in grads_a:
        assert_close(f"d{n}", grads_b[n], grads_a[n])
        if n in ("k", "v", "c"):
            assert not grads_b[n].masked_select(where.expand_as(grads_b[n])).any(), f"d{n} at padded keys"


CAUSAL = {  # case id: (built-in, options, key-side inputs to poison)
    "performer_causal": ("performer", dict(features=8, causal=True), "kv"),
    "performer_relu_causal": ("performer", dict(features=8, kernel="relu", causal=True), "kv"),
    "luna_causal": ("luna_causal", dict(length=L), "kvc"),
}
BAD = 11   # the poisoned key position: rows before it must not see it


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CAUSAL))
def test_future_keys_reach_no_earlier_row(name, backend, poison):
    """A non-finite value in a later key (k, v or pack keys c) changes no earlier row and no query gradient of a
    loss over earlier rows, forward and backward (grouped kv heads and a query offset included); on the fast
    backends no gradient at all."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    program, options, sides = CAUSAL[name]
    op = pd.compile(program, backend=backend, **options)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, N - 3, D, generator=g, dtype=dtype)           # rows at positions 3 .. N - 1
    keyed = {s: torch.randn(2, 2, N, D, generator=g, dtype=dtype) for s in sides}   # two kv heads
    keep = {"p": torch.randn(L, D, generator=g, dtype=dtype)} if program == "luna_causal" else {}
    rows = slice(0, BAD - 3)                                            # positions 3 .. BAD - 1

    def run(inputs):
        leaves = {n: t.detach().clone().requires_grad_() for n, t in {"q": q, **inputs, **keep}.items()}
        out = op(leaves["q"], leaves["k"], leaves["v"], q_offset=3, **{n: leaves[n] for n in leaves if n in "cp"})
        (out[:, :, rows] * torch.linspace(1, 2, D, dtype=dtype)).sum().backward()
        return out.detach(), {n: t.grad for n, t in leaves.items()}

    out_a, grads_a = run(keyed)
    for side in sides:
        bad = {s: t.clone() for s, t in keyed.items()}
        bad[side][:, 1, BAD, 2] = POISONS[poison]                      # kv head 1 serves query heads 2, 3
        out_b, grads_b = run(bad)
        assert_close(f"rows before the poisoned {side}", out_b[:, :, rows], out_a[:, :, rows])
        assert_close(f"heads not reading the poisoned {side}", out_b[:, :2], out_a[:, :2])
        seen = torch.isfinite(out_b[:, 2:, BAD - 3:]).all(-1)
        assert not seen.any(), "every row that sees the poisoned key holds a non-finite value"
        assert_close(f"dq of earlier rows (poisoned {side})", grads_b["q"][:, :, rows], grads_a["q"][:, :, rows])
        if backend != "reference":   # the dense reference's backward meets the poison in rows that see it
            for n in grads_a:        # (0 * nan under a zero upstream gradient); the fast backends stay exact
                assert_close(f"d{n} (poisoned {side})", grads_b[n], grads_a[n])
