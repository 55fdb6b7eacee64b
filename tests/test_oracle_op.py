"""The op against independent oracles (tests/oracles.py), in every backend: outputs and gradients of per-head
hybrids, scale options, padding, multi-stage programs (Luna's pack and unpack), grouped kv heads and query
offsets. Each oracle is written from the documentation with the scale, head ranges and GQA mapping spelled out
here, so a bug in the op's shared code (the default scale, head slicing and concatenation, padding routing)
shows, which the backend-versus-reference tests cannot see."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import oracles as O
import patterndsl as pd
from helpers import assert_close

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
B, D, L = 2, 16, 4
TOL = {"reference": 1e-10, "torch": 1e-10, "triton": 1e-5}

HYBRID = """pattern hybrid() {
    heads[0:1] attend softmax over causal, scale = 0.5
    heads[1:3] attend softmax over sliding(1)
    heads[3:4] attend linear(elu1)
}"""
LUNA_SCALED = """pattern luna_scaled(length: int = 4) {
    param p[length]
    packed = attend softmax query p keys input, scale = 0.1
    out = attend softmax query input keys packed, scale = 0.3
    return out, packed
}"""
FULL_SCALED = "pattern full_scaled() { attend softmax over full, scale = 0.1 }"
SLIDING_SCALED = "pattern sliding_scaled() { attend softmax over sliding(2), scale = 2.0 }"


@dataclass
class Case:
    """An op, its shapes, and the oracle `oracle(op, q, k, v, kpm, offset, extra, W) -> tuple of outputs`."""
    program: str
    params: dict
    oracle: Callable
    H: int = 4
    H_kv: int = 4
    n_q: int = 20
    n_k: int = 20
    offset: int = 0
    extra: dict = field(default_factory=dict)    # name -> "p" (a [L, D] param) or "c" (pack keys like k)
    features: int = 0                            # > 0: pass a projection W [features, D]


def _mask(op, n_q, n_k, offset, stage=None):
    return op.mask(n_q, n_k, stage=stage, q_offset=offset)


def dense_default(op, q, k, v, kpm, o, extra, w):
    return (O.softmax_attention(q, k, v, _mask(op, q.shape[2], k.shape[2], o), D ** -0.5, kpm),)


def dense_scaled(scale):
    def oracle(op, q, k, v, kpm, o, extra, w):
        return (O.softmax_attention(q, k, v, _mask(op, q.shape[2], k.shape[2], o), scale, kpm),)
    return oracle


def hybrid(op, q, k, v, kpm, o, extra, w):
    n_q, n_k = q.shape[2], k.shape[2]
    k, v = O.repeat_kv(k, 4), O.repeat_kv(v, 4)          # query head h reads kv head h // (4 / H_kv)
    causal = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + o
    band = (torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None] - o).abs() <= 1
    full = torch.ones(n_q, n_k, dtype=torch.bool)
    return (torch.cat([O.softmax_attention(q[:, 0:1], k[:, 0:1], v[:, 0:1], causal, 0.5, kpm),
                       O.softmax_attention(q[:, 1:3], k[:, 1:3], v[:, 1:3], band, D ** -0.5, kpm),
                       O.linear_attention(q[:, 3:4], k[:, 3:4], v[:, 3:4], full, "elu1", key_padding_mask=kpm)],
                      dim=1),)


def longformer_performer(op, q, k, v, kpm, o, extra, w):
    n_q, n_k = q.shape[2], k.shape[2]
    k, v = O.repeat_kv(k, 4), O.repeat_kv(v, 4)
    full = torch.ones(n_q, n_k, dtype=torch.bool)
    local = O.softmax_attention(q[:, :2], k[:, :2], v[:, :2], _mask(op, n_q, n_k, o, "_0"), D ** -0.5, kpm)
    return (torch.cat([local, O.linear_attention(q[:, 2:], k[:, 2:], v[:, 2:], full, "favor", w,
                                                 key_padding_mask=kpm)], dim=1),)


def linear(kind, causal):
    def oracle(op, q, k, v, kpm, o, extra, w):
        n_q, n_k = q.shape[2], k.shape[2]
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + o if causal else \
            torch.ones(n_q, n_k, dtype=torch.bool)
        return (O.linear_attention(q, k, v, allowed, kind, w, key_padding_mask=kpm),)
    return oracle


def luna_oracle(pack_scale, unpack_scale):
    def oracle(op, q, k, v, kpm, o, extra, w):
        return O.luna(q, k, v, extra["p"], kpm, pack_scale, unpack_scale)
    return oracle


def luna_causal(op, q, k, v, kpm, o, extra, w):
    return (O.luna_causal(q, k, v, extra["p"], extra["c"], o, kpm),)


CASES = {
    "longformer-w4-g0,5": Case("longformer", dict(window=4, globals={0, 5}), dense_default),
    "bigbird-block2": Case("bigbird", dict(block=2, window=3, globals=1, random_blocks=1), dense_default),
    "sparse_transformer-fixed": Case("sparse_transformer", dict(stride=4, variant="fixed", summary=1),
                                     dense_default),
    "scale0.1-full-short": Case(FULL_SCALED, {}, dense_scaled(0.1)),
    "scale0.1-full-decode": Case(FULL_SCALED, {}, dense_scaled(0.1), n_q=2, n_k=20, offset=18),
    "scale2-sliding": Case(SLIDING_SCALED, {}, dense_scaled(2.0)),
    "hybrid-causal0.5|sliding|elu1": Case(HYBRID, {}, hybrid),
    "hybrid-longformer_performer": Case("longformer_performer", dict(num_heads=4, local_heads=2, window=4,
                                                                     features=8), longformer_performer, features=8),
    "performer-favor-full": Case("performer", dict(features=8), linear("favor", False), features=8),
    "performer-favor-causal": Case("performer", dict(features=8, causal=True), linear("favor", True), features=8),
    "performer-relu-causal": Case("performer", dict(features=8, kernel="relu", causal=True), linear("relu", True),
                                  features=8),
    "luna-l4": Case("luna", dict(length=L), luna_oracle(D ** -0.5, D ** -0.5), extra={"p": "p"}),
    "luna-scaled-0.1,0.3": Case(LUNA_SCALED, {}, luna_oracle(0.1, 0.3), extra={"p": "p"}),
    "luna_causal-l4": Case("luna_causal", dict(length=L), luna_causal, extra={"p": "p", "c": "c"}),
    "gqa-longformer-H4-Hkv2": Case("longformer", dict(window=4, globals={0}), dense_default, H_kv=2),
    "gqa-hybrid-H4-Hkv2": Case(HYBRID, {}, hybrid, H_kv=2),
    "gqa-performer-causal-H4-Hkv1": Case("performer", dict(features=8, causal=True), linear("favor", True),
                                         H_kv=1, features=8),
    "offset-sliding_window-o14": Case("sliding_window", dict(window=5), dense_default, n_q=6, offset=14),
    "offset-longformer-o9": Case("longformer", dict(window=4, globals={0, 12}), dense_default, n_q=7, offset=9),
    "offset-performer-causal-o12": Case("performer", dict(features=8, causal=True), linear("favor", True),
                                        n_q=5, offset=12, features=8),
    "offset-luna_causal-o13": Case("luna_causal", dict(length=L), luna_causal, n_q=7, offset=13,
                                   extra={"p": "p", "c": "c"}),
}
PADDING = {"nopad": None, "pad": [(0, 2), (1, 15), (1, 16), (1, 17), (1, 18), (1, 19)]}


def _inputs(case: Case, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, case.H, case.n_q, D), rnd(B, case.H_kv, case.n_k, D), rnd(B, case.H_kv, case.n_k, D)
    extra = {n: rnd(L, D) if kind == "p" else rnd(B, case.H_kv, case.n_k, D) for n, kind in case.extra.items()}
    kpm = None
    if pad is not None:
        kpm = torch.zeros(B, case.n_k, dtype=torch.bool)
        for b, j in pad:
            if j < case.n_k:
                kpm[b, j] = True
    w = rnd(case.features, D) if case.features else None
    return q, k, v, extra, kpm, w


def _outputs_and_grads(fn, leaves: dict, seed=7):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], {n: t.grad for n, t in leaves.items()}


def compile_case(case: Case, backend: str, w):
    kw = dict(case.params)
    if w is not None:
        kw["projection"] = w
    return pd.compile(case.program, backend=backend, **kw)


# The interpreter is slow: Triton runs the cases that reach its distinct code (every kernel family, a
# scale option, per-head concatenation, pack and unpack, offsets, padding) once each.
TRITON_CASES = [("scale2-sliding", "nopad"), ("hybrid-causal0.5|sliding|elu1", "nopad"),
                ("luna-scaled-0.1,0.3", "nopad"), ("luna_causal-l4", "nopad"), ("performer-favor-causal", "nopad"),
                ("offset-longformer-o9", "nopad"), ("longformer-w4-g0,5", "pad")]


def _params():
    for backend in ("reference", "torch"):
        for name, case in CASES.items():
            for pad_name, pad in PADDING.items():
                yield pytest.param(backend, case, pad, id=f"{backend}-{name}-{pad_name}")
    skip = pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
    for name, pad_name in TRITON_CASES:
        yield pytest.param("triton", CASES[name], PADDING[pad_name], id=f"triton-{name}-{pad_name}", marks=skip)


@pytest.mark.parametrize("backend,case,pad", list(_params()))
def test_op_equals_the_oracle(backend, case, pad):
    q, k, v, extra, kpm, w = _inputs(case, pad)
    op = compile_case(case, backend, w)
    # Triton computes in float32 and refuses float64: it gets float32 leaves, the oracle their float64 values
    leaves = {n: t.float() if backend == "triton" else t for n, t in dict(q=q, k=k, v=v, **extra).items()}
    got, got_grad = _outputs_and_grads(
        lambda q, k, v, **ex: op(q, k, v, key_padding_mask=kpm, q_offset=case.offset, **ex), leaves)
    want, want_grad = _outputs_and_grads(
        lambda q, k, v, **ex: case.oracle(op, q.double(), k.double(), v.double(), kpm, case.offset,
                                          {n: t.double() for n, t in ex.items()}, w), leaves)
    tol = TOL[backend]
    assert len(got) == len(want), f"{len(got)} outputs, the oracle has {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(f"output {i}", a.double(), b, atol=tol, rtol=tol)
    for name in leaves:
        assert_close(f"d{name}", got_grad[name].double(), want_grad[name].double(), atol=tol * 10, rtol=tol * 10)


def test_the_oracles_reject_nothing_silently():
    """The oracle of a row with no allowed key is zeros with lse -inf (the documented contract)."""
    q = k = v = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    none = torch.zeros(3, 3, dtype=torch.bool)
    out, lse = O.softmax_attention(q, k, v, none, 1.0, return_lse=True)
    assert_close("out", out, torch.zeros_like(out))
    assert bool((lse == -math.inf).all())
