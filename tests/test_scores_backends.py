"""Score terms in every backend: the reference against a naive per-pair loop, the torch backend (gathered tiles)
and the FlexAttention score_mod against the reference (fp64, outputs and every gradient, bias tables included),
refusals where a backend has no score terms, and the op's checks of bias tables."""
import pytest
import torch

import patterndsl as pd
from patterndsl.ir import scores as S
from helpers import assert_close

TERMS = "bias = -alibi_slope(h, heads) * abs(i - j) + t5_bias(rel, 16, 40, bidir) * 0.5 + 0.1 * h / (j + 1)"
SRC = """pattern scored(heads: int = 4, w: int = 6, causal: bool = false, bidir: bool = true, cap: float = 2.5) {{
    param rel[heads, 16]
    attend softmax over {mask}, causal = causal, {terms}, softcap = cap
}}"""
MASKS = ["sliding(w) | global({1, 20})", "window(9, 2, 2) | where(j % 17 == 3)", "full", "blocks(16) - sliding(1)",
         "random(2, 16, 5)"]


def compile_(mask, backend, **params):
    return pd.compile(SRC.format(mask=mask, terms=TERMS), backend=backend, **params)


def inputs(B=2, H=4, H_kv=2, n_q=45, n_k=70, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_kv, n_k, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, n_k, D + 3, generator=g, dtype=torch.float64)
    rel = torch.randn(H, 16, generator=g, dtype=torch.float64)
    kpm = torch.rand(B, n_k, generator=g) < 0.15
    return [x.requires_grad_() for x in (q, k, v, rel)], kpm


def run(op, xs, kpm, q_offset, grad_out):
    q, k, v, rel = xs
    out = op(q, k, v, key_padding_mask=kpm, q_offset=q_offset, rel=rel)
    return [out] + list(torch.autograd.grad(out, xs, grad_out))


def test_reference_equals_a_loop_over_pairs():
    """The reference's dense torch code against the definition written pair by pair (docs/language.md §5.5)."""
    op = compile_("sliding(w)", "reference", causal=True, heads=2)
    (q, k, v, rel), kpm = inputs(B=1, H=2, H_kv=2, n_q=7, n_k=12)
    o = 3
    got = op(q, k, v, key_padding_mask=kpm, q_offset=o, rel=rel)
    term = S.T5Bias("rel", 16, 40, True)
    slopes = S.slopes(2)
    for h in range(2):
        for r in range(7):
            i = o + r
            keys = [j for j in range(12) if abs(i - j) <= 6 and j <= i and not kpm[0, j]]
            s = []
            for j in keys:
                t5 = float(rel.detach()[h, term.bucket_of(abs(j - i), j > i)])
                b = -slopes[h] * abs(i - j) + t5 * 0.5 + 0.1 * h / (j + 1)
                x = float(q[0, h, r] @ k[0, h, j]) / 8 ** 0.5 + b
                s.append(2.5 * torch.tanh(torch.tensor(x / 2.5, dtype=torch.float64)))
            want = torch.zeros(v.shape[-1], dtype=torch.float64)
            if keys:
                p = torch.softmax(torch.stack(s), 0)
                want = sum(p[n] * v[0, h, j] for n, j in enumerate(keys))
            assert_close(f"row {r} head {h}", got[0, h, r], want, atol=1e-12)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal,bidir,q_offset", [(False, True, 0), (True, False, 9), (False, False, 4)])
def test_torch_equals_reference(mask, causal, bidir, q_offset):
    xs, kpm = inputs()
    ref, tor = (compile_(mask, b, causal=causal, bidir=bidir) for b in ("reference", "torch"))
    g = torch.randn(2, 4, 45, 11, dtype=torch.float64)
    want, got = run(ref, xs, kpm, q_offset, g), run(tor, xs, kpm, q_offset, g)
    for name, a, b in zip(("out", "dq", "dk", "dv", "drel"), got, want):
        assert_close(name, a, b, atol=1e-11, rtol=1e-10)


def test_fully_masked_rows_output_zeros_with_finite_gradients():
    xs, _ = inputs(n_q=20, n_k=20)
    kpm = torch.zeros(2, 20, dtype=torch.bool)
    kpm[:, :8] = True                                   # rows 0 .. 1 of a causal window see only padding
    for backend in ("reference", "torch"):
        op = compile_("sliding(1)", backend, causal=True)
        out = run(op, xs, kpm, 0, torch.ones(2, 4, 20, 11, dtype=torch.float64))
        assert bool((out[0][:, :, :7] == 0).all()), backend
        assert all(bool(torch.isfinite(t).all()) for t in out), backend


def test_heads_see_their_absolute_index():
    """A stage under heads[2:4] biases with h = 2, 3 (and reads rows 2, 3 of the table)."""
    src = """pattern split(heads: int = 4) {
        param rel[heads, 8]
        heads[0:2] attend softmax over sliding(3)
        heads[2:4] attend softmax over sliding(3), bias = t5_bias(rel, 8, 20) + h
    }"""
    xs, kpm = inputs(H_kv=4)
    q, k, v, rel8 = xs[0], xs[1], xs[2], torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    outs = []
    for b in ("reference", "torch"):
        op = pd.compile(src, backend=b)
        out = op(q, k, v, rel=rel8)
        outs.append([out, *torch.autograd.grad(out.sum(), (q, rel8))])
    for a, b in zip(*outs):
        assert_close("split", a, b, atol=1e-11)
    assert bool((outs[0][2][:2] == 0).all()) and bool((outs[0][2][2:] != 0).any())
    plain = pd.compile("pattern s() { param rel[4, 8]\n"
                       " attend softmax over sliding(3), bias = t5_bias(rel, 8, 20) + h }", backend="reference")
    assert_close("heads 2..3", outs[0][0][:, 2:], plain(q, k, v, rel=rel8)[:, 2:], atol=1e-12)


def test_table_gradients_are_deterministic():
    xs, kpm = inputs()
    op = compile_(MASKS[0], "torch")
    g = torch.randn(2, 4, 45, 11, dtype=torch.float64)
    first, second = run(op, xs, kpm, 0, g)[4], run(op, xs, kpm, 0, g)[4]
    assert torch.equal(first, second)


def test_float32_and_bfloat16_run_close_to_float64():
    xs, kpm = inputs()
    want = compile_(MASKS[0], "reference")(*xs[:3], key_padding_mask=kpm, rel=xs[3])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        q, k, v, rel = (x.detach().to(dtype) for x in xs)
        got = compile_(MASKS[0], "torch")(q, k, v, key_padding_mask=kpm, rel=rel)
        assert got.dtype == dtype
        assert_close(str(dtype), got, want, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("table,message", [
    (torch.zeros(4, 15, dtype=torch.float64), "rel (a bias table) must be a tensor [4, 16], got [4, 15]"),
    (torch.zeros(4, 16), "rel must match q's dtype and device"),
    ("x", "rel (a bias table) must be a tensor [4, 16], got str"),
])
def test_bias_table_checks(table, message):
    (q, k, v, _), _ = inputs()
    with pytest.raises(pd.PatternError) as info:
        compile_("full", "torch")(q, k, v, rel=table)
    assert message in info.value.message


def test_table_rows_must_match_the_heads():
    (q, k, v, _), _ = inputs()
    with pytest.raises(pd.PatternError) as info:
        compile_("full", "torch", heads=2)(q, k, v, rel=torch.zeros(2, 16, dtype=torch.float64))
    assert "rel has one row per head (2), but q has 4 heads" in info.value.message


def test_a_missing_table_is_named():
    (q, k, v, _), _ = inputs()
    with pytest.raises(pd.PatternError) as info:
        compile_("full", "reference")(q, k, v)
    assert "needs the input 'rel'" in info.value.message and "[4, 16]" in info.value.hint


def test_triton_refuses_more_table_terms_than_its_kernels_read():
    """Triton runs tables and far fields (test_scores_triton.py, test_near_far.py); a bias with three table terms
    is refused with the reason, and `auto` runs it elsewhere."""
    from patterndsl.backends import get_backend
    src = SRC.format(mask="full", terms="bias = t5_bias(rel, 16) + t5_bias(rel, 16, 9, false) + t5_bias(rel, 16, 60)")
    op = pd.compile(src, backend="auto")
    why = "at most 2 bias tables in at most 2 terms, got 1 in 3"
    assert why in get_backend("triton").supports(op.ir.stages[0], "cuda")
    assert get_backend("triton").supports(compile_("full", "auto").ir.stages[0], "cuda") is None
    assert set(op.backends("cpu").values()) == {"torch"}
    with pytest.raises(pd.PatternError) as info:
        pd.compile(src, backend="triton").backends("cuda")
    assert why in info.value.hint


def test_a_backend_without_score_terms_refuses_the_stage():
    from patterndsl.op.scores import run_scored

    class Plain:
        name = "plain"
    op = compile_("full", "reference")
    with pytest.raises(pd.PatternError) as info:
        run_scored(Plain(), op.ir.stages[0], *([None] * 6))
    assert "the plain backend has no score terms" in info.value.message


def test_explain_names_the_scored_kernel():
    text = str(compile_(MASKS[0], "torch").explain(512))
    assert "torch.scored: gathered tiles" in text and "score terms (bias = " in text


# ------------------------------------------------------------------------------------------------- flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mask,q_offset", [(MASKS[0], 0), (MASKS[1], 7), ("full", 3)])
def test_flex_score_mod_equals_reference(mask, q_offset):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    (q, k, v, rel), _ = inputs(H_kv=4, n_q=40, n_k=40)
    q, k, v, rel = (x.detach() for x in (q, k, v, rel))
    op = compile_(mask, "reference", causal=True)
    mask_mod, score_mod = op.to_flex(n_q=40, score_mod=True, tables={"rel": rel}, q_offset=q_offset)
    bm = create_block_mask(mask_mod, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    got = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm)
    want = op(q, k, v, rel=rel, q_offset=q_offset)
    rows = op.mask(40, 40, q_offset=q_offset).any(-1)    # flex leaves rows without keys to its own convention
    assert_close("flex", got[:, :, rows], want[:, :, rows], atol=1e-12)


def test_flex_score_mod_errors():
    op = compile_("full", "reference")
    with pytest.raises(pd.PatternError) as info:
        op.to_flex(score_mod=True)
    assert "the score_mod reads the bias table 'rel'" in info.value.message
    with pytest.raises(pd.PatternError) as info:
        op.to_flex(score_mod=True, tables={"rel": 3})
    assert "table rel must be a tensor [H, width], got int" in info.value.message
    far = pd.compile("pattern f() { attend softmax over sliding(2), far = favor(4) }")
    with pytest.raises(pd.PatternError) as info:
        far.to_flex(score_mod=True)
    assert "has a far field" in info.value.message


DECODE_SRC = """pattern dec(heads: int = 4) {
    param rel[heads, 16]
    heads[0:2] attend softmax over sliding(6) | global({1}), causal = true,
        bias = -alibi_slope(h, heads) * abs(i - j) + t5_bias(rel, 16, 40, false), softcap = 2.5
    heads[2:4] attend softmax over causal, bias = 0.5 * t5_bias(rel, 16, 40, false) * (j + 1) / (i + 1)
}"""


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decode_applies_score_terms(backend):
    """Prefill (the backend's scored path) then one token at a time (the terms at the held keys' own positions,
    after the window dropped old keys) equals the whole causal forward, tables and absolute heads included."""
    g = torch.Generator().manual_seed(3)
    n = 150
    q = torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    rel = torch.randn(4, 16, generator=g, dtype=torch.float64)
    kpm = torch.rand(1, n, generator=g) < 0.1
    op = pd.compile(DECODE_SRC, backend=backend)
    want = pd.compile(DECODE_SRC, backend="reference")(q, k, v, key_padding_mask=kpm, rel=rel)
    cache = op.cache()
    outs = [op.decode(q[:, :, :40], k[:, :, :40], v[:, :, :40], cache, key_padding_mask=kpm[:, :40], rel=rel)]
    for t in range(40, n):
        outs.append(op.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache,
                              key_padding_mask=kpm[:, t:t + 1], rel=rel))
    assert cache.held()[op.ir.stages[0].name] < n                 # the window's old keys were dropped
    assert_close("decode", torch.cat(outs, 2), want, atol=1e-12)


def test_decode_refuses_a_far_field_with_the_reason():
    op = pd.compile("window_favor", window=4, features=8, backend="torch")
    with pytest.raises(pd.PatternError) as info:
        op.cache()
    assert "has a far field" in info.value.message and "q_offset=" in info.value.hint


def test_attend_window_applies_score_terms():
    """The transformers sliding-window cache path (keys from k_start on) applies the terms at their positions."""
    from patterndsl.decode import attend_window
    src = "pattern w(heads: int = 2) { attend softmax over sliding(5), causal = true, " \
          "bias = -alibi_slope(h, heads) * abs(i - j), softcap = 1.5 }"
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    op = pd.compile(src, backend="reference")
    want = op(q, k, v)[:, :, 20:]
    got = attend_window(op, q[:, :, 20:], k[:, :, 14:], v[:, :, 14:], q_offset=20, k_start=14)
    assert_close("window", got, want, atol=1e-12)


@pytest.mark.parametrize("mask,q_offset", [("sliding(w) | global({1, 20})", 9), ("blocks(16) - sliding(1)", 0),
                                           ("random(2, 16, 5)", 4)])
def test_torch_bias_in_the_flash_kernel_equals_reference(mask, q_offset):
    """A bias with no soft cap and a table without grad rides in the CPU flash kernel's float mask: outputs and
    q, k, v gradients equal the reference (grouped heads, padding, rows that see only padding)."""
    from patterndsl.backends.torch.scores import fused_bias
    src = SRC.format(mask=mask, terms=TERMS).replace(", softcap = cap", "")
    (q, k, v, rel), kpm = inputs()
    v = torch.randn(2, 2, 70, 8, dtype=torch.float64, requires_grad=True)    # the kernel takes D_v == D
    kpm[1, :40] = True                                                      # early rows of batch 1: no key
    rel = rel.detach()
    op = pd.compile(src, backend="torch", causal=True)
    assert fused_bias(op.ir.stages[0], q, k, v, {"rel": rel})
    assert not fused_bias(op.ir.stages[0], q, k, v, {"rel": rel.requires_grad_()})
    rel = rel.detach()
    g = torch.randn(2, 4, 45, 8, dtype=torch.float64)
    res = []
    for backend in ("reference", "torch"):
        out = pd.compile(src, backend=backend, causal=True)(q, k, v, key_padding_mask=kpm, q_offset=q_offset, rel=rel)
        res.append([out, *torch.autograd.grad(out, (q, k, v), g)])
    assert bool((res[1][0][1, :, :5] == 0).all())
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert bool(torch.isfinite(a).all()), name
        assert_close(name, a, b, atol=1e-11, rtol=1e-10)
