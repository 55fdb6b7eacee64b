"""Grouped-query k, v and query positions at the op, in every backend: outputs and every gradient equal the
float64 reference run on kv heads repeated for their query heads and on queries padded in front to their
positions (rows o .. of the full call), for softmax masks of every family, linear attention and causal Luna;
per-batch offsets; per-head programs whose head ranges do or do not align with the kv groups; and the checks."""
import os

import pytest
import torch

import patterndsl as pd
from helpers import assert_close
from patterndsl import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.ir.program import Elu1, Favor, Linear, ProgramIR, ReluFeatures, Softmax, Stage
from patterndsl.op import AttentionOp

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="no triton"))]


def _ir(mask=M.FULL, norm=Softmax()):
    return ProgramIR("p", (Stage("out", norm, mask),), ("out",))


WHERE = pd.parse("pattern w() { attend softmax over where((i + 2 * j) % 3 == 0 or i - j >= 9) }").lower()
PROGRAMS = {
    "causal": _ir(M.CAUSAL),
    "sliding-globals": _ir(M.sliding(3) | M.global_({0, 9})),
    "random-blocks": _ir(M.Random(2, 4, 1) | M.blocks(6)),
    "same-causal": _ir(M.Same("seg") & M.CAUSAL),
    "where": WHERE,
    "favor-causal": _ir(M.CAUSAL, Linear(Favor(8))),
    "relu-full": _ir(M.FULL, Linear(ReluFeatures(8))),
    "elu1-causal": _ir(M.CAUSAL, Linear(Elu1())),
    "luna-causal": pd.builtin("luna_causal").lower(length=3),
}
CASES = {"H4-Hkv4-o0": (4, 4, 0), "H4-Hkv2-o5": (4, 2, 5), "H4-Hkv1-o3,17": (4, 1, (3, 17))}
B, NQ, NK, D = 2, 6, 20, 16


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(ir, H, Hk, offsets):
    x = {"q": _rand(B, H, NQ, D, seed=1), "k": _rand(B, Hk, NK, D, seed=2), "v": _rand(B, Hk, NK, D, seed=3)}
    names = AttentionOp(None, ir).input_names()
    if "p" in names:
        x["p"] = _rand(H, 3, D, seed=4)
    if "c" in names:
        x["c"] = _rand(B, Hk, NK, D, seed=5)
    ids = torch.randint(0, 3, (B, max(NK, max(offsets) + NQ)), generator=torch.Generator().manual_seed(6))
    kpm = torch.zeros(B, NK, dtype=torch.bool)
    kpm[0, 4] = kpm[1, -3:] = True
    return x, ({"seg": ids} if "seg" in names else {}), kpm


def _run(op, x, runtime, kpm, dout, **kw):
    """Outputs and gradients (on the CPU); the Triton backend runs on CUDA when there is one, in float32 (its
    kernels refuse float64, which they would compute at float32 accuracy)."""
    dev = "cuda" if op.backend == "triton" and torch.cuda.is_available() else "cpu"
    wide = torch.float32 if op.backend == "triton" else torch.float64

    def to(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(dev, wide) if t.is_floating_point() else t.to(dev)
    leaves = {n: to(t).detach().clone().requires_grad_() for n, t in x.items()}
    out = op(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=to(kpm), **{n: to(t) for n, t in kw.items()},
             **{n: to(t) for n, t in runtime.items()}, **{n: t for n, t in leaves.items() if n in ("p", "c")})
    out.backward(to(dout))
    return out.detach().cpu(), {f"d{n}": t.grad.cpu() for n, t in leaves.items()}


def _oracle(ir, x, runtime, kpm, dout, offsets):
    """Row b: the reference on kv heads repeated and on queries put at positions o_b .. by o_b rows in front."""
    ref = AttentionOp(None, ir, backend="reference")
    outs, grads = [], {f"d{n}": torch.zeros_like(t) for n, t in x.items()}
    for b, o in enumerate(offsets):
        rows = {n: t[b:b + 1] if n != "p" else t for n, t in x.items()}
        G = x["q"].shape[1] // x["k"].shape[1]
        pad = _rand(1, x["q"].shape[1], o, D, seed=10 + b)
        leaves = {n: t.detach().clone().requires_grad_() for n, t in rows.items()}
        rep = {n: leaves[n].repeat_interleave(G, 1) for n in ("k", "v", "c") if n in leaves}
        q = torch.cat([pad, leaves["q"]], 2)
        ids = {n: (t[b:b + 1, :o + NQ], t[b:b + 1, :NK]) for n, t in runtime.items()}
        extra = {n: leaves[n] for n in ("p",) if n in leaves}
        out = ref(q, rep["k"], rep["v"], key_padding_mask=kpm[b:b + 1], **ids, **extra,
                  **({"c": rep["c"]} if "c" in rep else {}))[:, :, o:]
        out.backward(dout[b:b + 1])
        outs.append(out.detach())
        for n, t in leaves.items():
            if n == "p":
                grads["dp"] += t.grad
            else:
                grads[f"d{n}"][b:b + 1] = t.grad
    return torch.cat(outs), grads


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("name", list(PROGRAMS), ids=list(PROGRAMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_heads_and_positions_equal_the_repeated_reference(backend, name, case):
    H, Hk, *rest = CASES[case]
    offsets = rest[0] if rest else 0
    per_row = offsets if isinstance(offsets, tuple) else (offsets,) * B
    ir = PROGRAMS[name]
    x, runtime, kpm = _inputs(ir, H, Hk, per_row)
    dout = _rand(B, H, NQ, D, seed=7)
    q_offset = torch.tensor(offsets) if isinstance(offsets, tuple) else offsets
    got, dgot = _run(AttentionOp(None, ir, backend=backend), x, runtime, kpm, dout, q_offset=q_offset)
    want, dwant = _oracle(ir, x, runtime, kpm, dout, per_row)
    tol = 2e-4 if backend == "triton" else 1e-10
    assert_close("out", got, want, atol=tol, rtol=tol)
    for n in dwant:
        assert_close(n, dgot[n], dwant[n], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("local,Hk", [(2, 2), (1, 2), (3, 4)], ids=["aligned-G2", "unaligned-G2", "G1"])
def test_per_head_programs_map_their_kv_heads(backend, local, Hk):
    """heads[0:local] softmax, heads[local:4] FAVOR+: each stage reads kv heads h // G (repeated only when its
    range splits a group), as the reference with repeated heads."""
    kw = dict(num_heads=4, local_heads=local, window=4, globals={0}, features=8)
    op = pd.compile("longformer_performer", backend=backend, **kw)
    x = {"q": _rand(1, 4, 10, D, seed=1), "k": _rand(1, Hk, 10, D, seed=2), "v": _rand(1, Hk, 10, D, seed=3)}
    dout = _rand(1, 4, 10, D, seed=4)
    got, dgot = _run(op, x, {}, None, dout)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    ref = pd.compile("longformer_performer", backend="reference", **kw)
    out = ref(leaves["q"], *(leaves[n].repeat_interleave(4 // Hk, 1) for n in ("k", "v")))
    out.backward(dout)
    assert_close("out", got, out, atol=1e-10)
    for n, t in leaves.items():
        assert_close(f"d{n}", dgot[f"d{n}"], t.grad, atol=1e-10)


def test_mask_at_an_offset_is_rows_of_the_full_mask():
    op = pd.compile("longformer", window=4, globals={0, 12}, causal=True, backend="reference")
    assert torch.equal(op.mask(5, 20, q_offset=9), op.mask(14, 20)[9:])
    assert torch.equal(op.block_layout(5, 20, (4, 4), q_offset=9).bool(),
                       pd.compile("longformer", window=4, globals={0, 12}, causal=True).block_layout(
                           5, 20, (4, 4), q_offset=9).bool())
    hybrid = pd.compile("longformer_performer", num_heads=2, local_heads=1, window=4, features=4)
    assert torch.equal(hybrid.mask(3, 9, q_offset=6), hybrid.mask(9, 9)[:, 6:])


def test_a_default_offset_keeps_the_old_meaning():
    op = pd.compile("sliding_window", window=3, backend="torch")
    q, k, v = _rand(1, 2, 4, 8, seed=1), _rand(1, 2, 9, 8, seed=2), _rand(1, 2, 9, 8, seed=3)
    allowed = dense_mask(M.window(2, 0), 4, 9)
    from patterndsl.backends.reference.softmax import softmax_attention
    assert_close("out", op(q, k, v), softmax_attention(q, k, v, allowed, 8 ** -0.5)[0], atol=1e-12)


def test_batch_of_zero_in_every_backend():
    for backend in ("reference", "torch") + (("triton",) if TRITON else ()):
        for name, ir in PROGRAMS.items():
            dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
            x, runtime, kpm = _inputs(ir, 4, 2, (0, 0))
            x = {n: (t[:0] if n != "p" else t).to(dev).requires_grad_() for n, t in x.items()}
            runtime = {n: t[:0].to(dev) for n, t in runtime.items()}
            op = AttentionOp(None, ir, backend=backend)
            out = op(x["q"], x["k"], x["v"], key_padding_mask=kpm[:0].to(dev), **runtime,
                     **{n: t for n, t in x.items() if n in ("p", "c")})
            assert out.shape == (0, 4, NQ, D), (backend, name)
            out.sum().backward()
            assert all(t.grad is not None and t.grad.shape == t.shape and not t.grad.abs().sum()
                       for t in x.values()), (backend, name)
    luna = pd.compile("luna", length=3, backend="torch")
    q = _rand(0, 2, 5, 4, seed=1)
    out, packed = luna(q, q, q, p=_rand(3, 4, seed=2))
    assert out.shape == (0, 2, 5, 4) and packed.shape == (0, 2, 3, 4)


# ------------------------------------------------------------------------------------------------ checks
def _raises(msg, fn, *args, **kw):
    import re
    with pytest.raises(PatternError, match=re.escape(msg)):
        fn(*args, **kw)


OP = pd.compile("sliding_window", window=3, backend="reference")
Q = torch.zeros(2, 4, 3, 8)
KV = torch.zeros(2, 2, 5, 8)


def test_kv_heads_must_divide_the_query_heads():
    k = torch.zeros(2, 3, 5, 8)
    with pytest.raises(PatternError, match=r"k and v must have a number of heads dividing q's 4 \(grouped-query "
                                           r"attention\), got 3: q \[2, 4, 3, 8\], k \[2, 3, 5, 8\]") as e:
        OP(Q, k, k)
    assert "H_kv in [1, 2, 4]" in str(e.value)


def test_offset_checks():
    _raises("q_offset must be >= 0, got -1", OP, Q, KV, KV, q_offset=-1)
    _raises("q_offset must be an int or an integer tensor [2], got float", OP, Q, KV, KV, q_offset=1.5)
    _raises("q_offset must be an int or an integer tensor [2], got bool", OP, Q, KV, KV, q_offset=True)
    _raises("q_offset must be an int or an integer tensor [2] (one per batch row), got torch.int64 [3]", OP, Q, KV, KV,
            q_offset=torch.tensor([1, 2, 3]))
    _raises("q_offset must be an int or an integer tensor [2] (one per batch row), got torch.float32 [2]", OP, Q, KV,
            KV, q_offset=torch.tensor([1.0, 2.0]))
    _raises("q_offset must be >= 0, got -4", OP, Q, KV, KV, q_offset=torch.tensor([3, -4]))


def test_positions_stay_below_2_to_the_31():
    _raises("positions must stay below 2^31: q_offset 2147483646 + N_q 3 puts the last query at position "
            "2147483648", OP, Q, KV, KV, q_offset=2 ** 31 - 2)
    assert OP(Q, KV, KV, q_offset=2 ** 31 - 3).shape == (2, 4, 3, 8)
    _raises("positions must stay below 2^31: q_offset 2147483647 + n_q 2, n_k 4", OP.mask, 2, 4, q_offset=2 ** 31 - 1)
    _raises("q_offset must be an int >= 0, got -2", OP.mask, 2, 4, q_offset=-2)


def test_runtime_ids_at_an_offset():
    op = AttentionOp(None, PROGRAMS["same-causal"], backend="reference")
    ids = torch.zeros(2, 9, dtype=torch.long)
    _raises("seg must be an integer tensor [2, 7] (the ids of positions 0 .. 6) or a pair (query ids [2, 3], key ids "
            "[2, 5]), got torch.int64 [2, 9]", op, Q, KV, KV, q_offset=4, seg=ids)
    assert op(Q, KV, KV, q_offset=4, seg=ids[:, :7]).shape == (2, 4, 3, 8)


def test_a_stage_reading_another_stage_needs_its_head_dim():
    luna = pd.compile("luna", length=3, backend="torch")
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(PatternError, match=r"stage out of luna reads keys from stage packed, whose output has head "
                                           r"dim 6 \(v's\), but its queries have head dim 4") as e:
        luna(q, q, torch.zeros(1, 2, 5, 6), p=torch.zeros(3, 4))
    assert "v [B, H_kv, N_k, 4]" in str(e.value)


@pytest.mark.skipif(not TRITON, reason="no triton")
def test_a_backend_error_names_the_stage_and_backend_once():
    op = pd.compile("sliding_window", window=3, backend="triton")
    q = torch.zeros(1, 2, 4, 512, device="cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PatternError, match=r"^error: stage _0 of sliding_window on the triton backend: the Triton "
                                           r"kernels take head dims up to 256, got q 512, v 512") as e:
        op(q, q, q)
    assert str(e.value).count("stage _0") == 1 and "use backend='torch' for larger heads" in str(e.value)
