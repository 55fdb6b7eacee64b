"""Decoding (`op.cache()`, `op.decode`): prefill then decode equals the full forward of every causal built-in in
float64 (token by token and in multi-token steps, batch 2, grouped kv heads, padding), a decode step equals the
op at its offset for any pattern, caches of bounded masks stay bounded, the retention rule of every primitive is
sound against the dense mask, and the checks."""
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterndsl as pd
from helpers import assert_close
from patterndsl import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.ir.program import ProgramIR, Softmax, Stage
from patterndsl.op import AttentionOp
from test_layout import rich_masks

CAUSAL_BUILTINS = {
    "longformer-causal": ("longformer", dict(window=6, globals={0, 5, 30}, causal=True)),
    "dilated_window-causal": ("dilated_window", dict(window=6, dilation=2, causal=True)),
    "sliding_window": ("sliding_window", dict(window=5)),
    "sparse_transformer": ("sparse_transformer", dict(stride=4)),
    "sparse_transformer-fixed": ("sparse_transformer", dict(stride=4, variant="fixed", summary=1)),
    "prefix_lm": ("prefix_lm", dict(prefix=7)),
    "performer-causal": ("performer", dict(causal=True, features=8)),
    "relu-causal": ("performer", dict(causal=True, kernel="relu", features=8)),
    "luna_causal": ("luna_causal", dict(length=3)),
}
STEPS = {"token-by-token": [8] + [1] * 32, "multi-token": [13, 1, 4, 1, 1, 9, 2, 1, 8]}   # prefill >= the prefix
B, H, HKV, N, D, DV = 2, 4, 2, 40, 8, 5


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _data(op, n=N):
    x = {"q": _rand(B, H, n, D, seed=1), "k": _rand(B, HKV, n, D, seed=2), "v": _rand(B, HKV, n, DV, seed=3)}
    if "c" in op.input_names():
        x["c"] = _rand(B, HKV, n, D, seed=4)
    kpm = torch.zeros(B, n, dtype=torch.bool)
    kpm[0, 3] = kpm[1, 10:13] = True
    return x, ({"p": _rand(H, 3, D, seed=5)} if "p" in op.input_names() else {}), kpm


def _decode(op, x, fixed, kpm, steps, **ids):
    cache, outs, t = op.cache(), [], 0
    for n in steps:
        part = {name: y[:, :, t:t + n] for name, y in x.items()}
        step_ids = {name: y[:, t:t + n] for name, y in ids.items()}
        outs.append(op.decode(part.pop("q"), part.pop("k"), part.pop("v"), cache, key_padding_mask=kpm[:, t:t + n],
                              **part, **fixed, **step_ids))
        t += n
    assert cache.length == t
    return torch.cat(outs, 2), cache


@pytest.mark.parametrize("steps", list(STEPS), ids=list(STEPS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", list(CAUSAL_BUILTINS), ids=list(CAUSAL_BUILTINS))
def test_prefill_then_decode_equals_the_full_forward(case, backend, steps):
    name, kw = CAUSAL_BUILTINS[case]
    op = pd.compile(name, backend=backend, **kw)
    x, fixed, kpm = _data(op)
    full = op(x["q"], x["k"], x["v"], key_padding_mask=kpm, **{n: y for n, y in x.items() if n == "c"}, **fixed)
    got, _ = _decode(op, x, fixed, kpm, STEPS[steps])
    assert_close("decoded", got, full, atol=1e-10)


TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["sliding_window", "longformer-causal", "performer-causal"])
def test_decode_on_the_triton_backend(case):
    """The prompt runs on the Triton kernels (at an offset, with grouped heads), the steps on the held keys."""
    name, kw = CAUSAL_BUILTINS[case]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    op = pd.compile(name, backend="triton", **kw)
    x, fixed, kpm = _data(op, 40)
    x = {n: t.float().to(dev) for n, t in x.items()}
    kpm = kpm.to(dev)
    got, _ = _decode(op, x, fixed, kpm, [20, 1, 1, 5, 1, 12])
    want = pd.compile(name, backend="reference", **kw)(*(x[n].double() for n in ("q", "k", "v")), key_padding_mask=kpm)
    assert_close("decoded", got, want, atol=2e-4, rtol=2e-4)


def test_a_step_equals_the_op_at_its_offset_for_any_pattern():
    """Not causal: the rows of a step see every key so far (op(q, K, V, q_offset=t)), never a later one."""
    ops = [pd.compile("longformer", window=4, globals={2}, backend="torch"),
           pd.compile("performer", features=8, backend="torch"),
           pd.compile("longformer_performer", num_heads=4, local_heads=1, window=4, features=8, backend="torch"),
           AttentionOp(None, ProgramIR("r", (Stage("out", Softmax(), M.Random(1, 4, 3) | M.CAUSAL),), ("out",)))]
    for op in ops:
        x, _, kpm = _data(op, 30)
        cache, t = op.cache(), 0
        for n in (11, 1, 1, 6, 1, 10):
            part = {name: y[:, :, :t + n] for name, y in x.items()}
            got = op.decode(x["q"][:, :, t:t + n], x["k"][:, :, t:t + n], x["v"][:, :, t:t + n], cache,
                            key_padding_mask=kpm[:, t:t + n])
            want = op(part["q"][:, :, t:], part["k"], part["v"], key_padding_mask=kpm[:, :t + n], q_offset=t)
            assert_close(f"{op.name} rows {t}..{t + n}", got, want, atol=1e-10)
            t += n


def test_runtime_ids_while_decoding():
    op = AttentionOp(None, ProgramIR("s", (Stage("out", Softmax(), M.Same("seg") & M.window(6, 0)),), ("out",)),
                     backend="torch")
    x, _, kpm = _data(op, 300)
    seg = (torch.arange(300) // 37).repeat(B, 1)
    full = op(x["q"], x["k"], x["v"], key_padding_mask=kpm, seg=seg)
    got, cache = _decode(op, x, {}, kpm, [20] + [1] * 280, seg=seg)
    assert_close("decoded", got, full, atol=1e-10)
    assert cache.held()["out"] < 2 * (7 + 64)


@pytest.mark.parametrize("name,kw,bound", [
    ("sliding_window", dict(window=16), 2 * (16 + 64)),
    ("longformer", dict(window=8, globals={0, 1, 2, 50}, causal=True), 2 * (5 + 4 + 64)),
    ("dilated_window", dict(window=8, dilation=3, causal=True), 2 * (13 + 64)),
], ids=["window", "window-and-globals", "dilated"])
def test_bounded_patterns_keep_a_bounded_cache(name, kw, bound):
    op = pd.compile(name, backend="torch", **kw)
    x, fixed, kpm = _data(op, 600)
    got, cache = _decode(op, x, fixed, kpm, [100] + [1] * 500)
    assert max(cache.held().values()) <= bound
    assert_close("decoded", got, op(x["q"], x["k"], x["v"], key_padding_mask=kpm), atol=1e-10)


def test_a_key_that_is_never_seen_again_cannot_reach_an_output():
    """A non-finite key and value at position 0 leave the window: later steps stay finite and exact."""
    op = pd.compile("sliding_window", window=4, backend="torch")
    x, _, kpm = _data(op, 30)
    x["k"][:, :, 0], x["v"][:, :, 0] = float("nan"), float("inf")
    got, _ = _decode(op, x, {}, torch.zeros_like(kpm), [8] + [1] * 22)
    want = pd.compile("sliding_window", window=4, backend="reference")(x["q"], x["k"], x["v"])
    assert_close("decoded", got, want, atol=1e-10)
    assert torch.isfinite(got[:, :, 4:]).all()


@settings(max_examples=150, deadline=None)
@given(rich_masks(), st.integers(0, 60), st.integers(1, 40))
def test_retention_is_sound(m, t, horizon):
    """Every key a query at a position in [t, t + horizon) may see is kept by `retained(t)`."""
    n = t + horizon
    seen = dense_mask(m, horizon, n, q_offset=t).any(-2) if not M.runtime_inputs(m) else torch.ones(n, dtype=bool)
    kept = m.retained(t).holds(torch.arange(n))
    assert not (seen & ~kept).any(), f"{M.to_source(m)} at t={t}: keys {(seen & ~kept).nonzero().flatten().tolist()}"


def test_retention_rules():
    K = M.Keep
    assert M.sliding(3).retained(10) == K(7) and M.window(4, 0).retained(2) == K(0)
    assert M.CAUSAL.retained(50) == M.KEEP_ALL and M.strided(4).retained(9) == M.KEEP_ALL
    assert M.cols({1, 70}).retained(60) == K(None, frozenset({1, 70}))
    assert M.rows({5}).retained(5) == M.KEEP_ALL and M.rows({5}).retained(6) == K(None)
    assert M.blocks(8).retained(21) == K(16) and M.EMPTY.retained(3) == K(None)
    assert (M.window(4, 0) | M.global_({0})).retained(30) == K(26, frozenset({0}))
    assert (M.window(4, 0) & M.cols({3, 40})).retained(30) == K(None, frozenset({40}))
    assert (~M.window(4, 0)).retained(30) == M.KEEP_ALL


# ------------------------------------------------------------------------------------------------ checks
def _raises(msg, fn, *args, **kw):
    with pytest.raises(PatternError, match=re.escape(msg)):
        fn(*args, **kw)


def test_decode_checks():
    op = pd.compile("sliding_window", window=3, backend="torch")
    q, kv = torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4)
    _raises("op.decode needs a cache from this op's op.cache(), got dict", op.decode, q, kv, kv, {})
    other = pd.compile("sliding_window", window=3, backend="torch").cache()
    _raises("op.decode needs a cache from this op's op.cache(), got a cache of another op", op.decode, q, kv, kv, other)
    cache = op.cache()
    _raises("op.decode takes the new tokens' queries, keys and values: q [1, 2, 2, 4] has 2, k [1, 2, 3, 4] has 3",
            op.decode, q, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), cache)
    op.decode(q, kv, kv, cache)
    _raises("this cache was filled with kv heads 2, got 1", op.decode, q, kv[:, :1], kv[:, :1], cache)
    _raises("this cache was filled with dtype torch.float32, got torch.float64", op.decode, q.double(), kv.double(),
            kv.double(), cache)
    with pytest.raises(PatternError, match="stage packed of luna reads queries from p") as e:
        pd.compile("luna", length=2).cache()
    assert "run the whole sequence with op(q, k, v) instead" in str(e.value)


def test_decode_refuses_a_redrawn_projection_and_runs_without_gradients():
    op = pd.compile("performer", causal=True, features=4, backend="torch")
    cache = op.cache()
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    out = op.decode(q, q, q, cache)
    assert not out.requires_grad
    op.redraw()
    _raises("stage _0 drew new random features (op.redraw()) since this cache was filled", op.decode, q, q, q, cache)


def test_decode_positions_stay_below_2_to_the_31():
    op = pd.compile("performer", causal=True, features=4, backend="torch")
    cache = op.cache()
    cache.length = 2 ** 31 - 1
    q = torch.zeros(1, 2, 2, 4)
    _raises("positions must stay below 2^31: q_offset 2147483647 + N_q 2 puts the last query at position 2147483648",
            op.decode, q, q, q, cache)
