"""Score terms on Triton: the generated text of the terms (`backends/triton/scores.py`) equals their torch
evaluation, and the scored kernels (`scored.py`: bias, learned tables, soft cap) equal the reference, outputs and
every gradient (the tables' included), on random masks, offsets, padding and grouped heads (the interpreter on
the CPU)."""
import os

import pytest
import torch

pytest.importorskip("triton")

import patterndsl as pd  # noqa: E402
from patterndsl.backends.triton.scores import score_grid, score_source  # noqa: E402
from patterndsl.ir.scores.ops import TorchScoreOps  # noqa: E402
from helpers import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
SRC = """pattern s(heads: int = 5) {{
    param rel[heads, 16]
    param pos[heads, 8]
    attend softmax over causal, {terms}
}}"""
TERMS = [
    "bias = -alibi_slope(h, heads) * abs(i - j)",
    "bias = t5_bias(rel, 16, 40, true) * 0.5 + t5_bias(pos, 8, 12, false), softcap = 3.0",
    "bias = 0.1 * h / (j - 3) - min(i, j) * 2 + max(1.5, j / 7), softcap = 1e-3",
    "softcap = 30.0",
    "bias = (i - j) * (i + j) / 1000",
]


@pytest.mark.parametrize("terms", TERMS)
@pytest.mark.parametrize("head,q_offset", [(0, 0), (3, 17)])
def test_generated_score_equals_torch(terms, head, q_offset):
    op = pd.compile(SRC.format(terms=terms), backend="reference")
    score = op.ir.stages[0].score
    g = torch.Generator().manual_seed(head)
    tables = {"rel": torch.randn(5, 16, generator=g), "pos": torch.randn(5, 8, generator=g)}
    s = 4 * torch.randn(21, 30, generator=g)
    got = score_grid(score, s, q_offset, head, tables)
    i = torch.arange(21)[:, None] + q_offset
    j = torch.arange(30)[None, :]
    ops = TorchScoreOps(i, j, torch.tensor([[[head]]]), {k: t.double() for k, t in tables.items()}, torch.float64)
    want = score.apply(s.double(), ops).expand(1, 21, 30)[0]
    assert_close(terms, got, want, atol=2e-5, rtol=2e-5)


def test_a_far_field_has_no_score_function():
    op = pd.compile("pattern f() { attend softmax over sliding(2), far = favor(4) }")
    with pytest.raises(pd.PatternError) as info:
        score_source(op.ir.stages[0].score)
    assert "a far field has no pointwise score function" in info.value.message


def test_more_than_two_tables_are_refused():
    src = ("pattern t() { param a[2, 4]\n param b[2, 4]\n param c[2, 4]\n"
           " attend softmax, bias = t5_bias(a, 4) + t5_bias(b, 4) + t5_bias(c, 4) }")
    with pytest.raises(pd.PatternError) as info:
        score_source(pd.compile(src).ir.stages[0].score)
    assert "at most 2 bias tables, got 3" in info.value.message


KERNEL_SRC = """pattern k(heads: int = 4) {{
    attend softmax over {mask}, causal = {causal}, bias = -alibi_slope(h, heads) * abs(i - j) + 0.2 * h / (j + 1),
        softcap = 2.5
}}"""


@pytest.mark.parametrize("mask,causal,q_offset", [
    ("sliding(5) | global({3})", "true", 6), ("full", "false", 0), ("window(9, 2, 2) | where(j % 7 == 1)", "false", 3),
    ("random(1, 16, 3) | blocks(8)", "true", 0)])
def test_triton_kernels_equal_the_reference(mask, causal, q_offset):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(2, 2, 45, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    kpm = torch.rand(2, 45, generator=g) < 0.2
    res = []
    for backend in ("reference", "triton"):
        out = pd.compile(KERNEL_SRC.format(mask=mask, causal=causal), backend=backend)(
            q, k, v, q_offset=q_offset, key_padding_mask=kpm)
        res.append([out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out) / 7)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), res[1], res[0]):
        assert_close(name, a, b, atol=2e-5, rtol=2e-5)


def test_triton_heads_see_their_absolute_index():
    src = """pattern split(heads: int = 4) {
        heads[0:2] attend softmax over sliding(3), bias = 0.5 * h
        heads[2:4] attend softmax over sliding(3), bias = -0.3 * h * abs(i - j)
    }"""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 20, 16, generator=g) for _ in range(3))
    want = pd.compile(src, backend="reference")(q, k, v)
    assert_close("heads", pd.compile(src, backend="triton")(q, k, v), want, atol=2e-5, rtol=2e-5)


TABLE_SRC = """pattern t(heads: int = 4, bidir: bool = true) {{
    param rel[heads, 16]
    param pos[heads, 8]
    attend softmax over {mask}, causal = {causal}, bias = {bias}{cap}
}}"""
TABLE_BIASES = [
    "t5_bias(rel, 16, 40, bidir)",
    "t5_bias(rel, 16, 40, bidir) * 0.5 - alibi_slope(h, heads) * abs(i - j) + t5_bias(pos, 8, 12, false)",
    # derivatives through products, quotients, abs, min and max of table values
    "t5_bias(rel, 16, 40, bidir) * t5_bias(pos, 8, 12, false) / (j + 2) + abs(t5_bias(pos, 8, 12, false))",
    "min(t5_bias(rel, 16, 40, bidir), 0.3) * (i - j) / 10 + max(t5_bias(rel, 16, 9, false), -0.2)",
]


def table_inputs(seed=5, n_q=37, n_k=45):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n_q, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n_k, 8, generator=g, dtype=torch.float64) for _ in range(2))
    rel, pos = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    kpm = torch.rand(2, n_k, generator=g) < 0.2
    return [x.requires_grad_() for x in (q, k, v, rel, pos)], kpm


def run_tables(src, backend, xs, kpm, q_offset, grad_out, **params):
    q, k, v, rel, pos = xs
    op = pd.compile(src, backend=backend, **params)
    tables = {n: t for n, t in (("rel", rel), ("pos", pos)) if n in op.input_names()}
    out = op(q, k, v, key_padding_mask=kpm, q_offset=q_offset, **tables)
    leaves = [q, k, v, *tables.values()]
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


@pytest.mark.parametrize("bias,mask,causal,bidir,q_offset,cap", [      # each bias on one mask (interpreter time)
    (TABLE_BIASES[0], "sliding(5) | global({3})", "true", False, 6, ", softcap = 2.5"),
    (TABLE_BIASES[1], "full", "false", True, 0, ""),
    (TABLE_BIASES[2], "window(9, 2, 2) | where(j % 7 == 1)", "false", True, 3, ", softcap = 4.0"),
    (TABLE_BIASES[3], "random(1, 16, 3) | blocks(8)", "true", True, 0, ""),
    (TABLE_BIASES[1], "sliding(5) | global({3})", "true", False, 6, ", softcap = 2.5")])
def test_triton_learned_tables_equal_the_reference(bias, mask, causal, bidir, q_offset, cap):
    """t5_bias tables on the Triton kernels: outputs and the gradients of q, k, v and of every table (fp64
    reference; the kernels compute in float32)."""
    xs, kpm = table_inputs()
    src = TABLE_SRC.format(mask=mask, causal=causal, bias=bias, cap=cap)
    g = torch.randn(2, 4, 37, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = run_tables(src, "reference", xs, kpm, q_offset, g, bidir=bidir)
    got = run_tables(src, "triton", xs, kpm, q_offset, g, bidir=bidir)
    assert len(got) == 6 if "pos" in bias else len(got) == 5
    for name, a, b in zip(("out", "dq", "dk", "dv", "drel", "dpos"), got, want):
        assert float(b.detach().abs().max()) > 1e-3, name          # every gradient is exercised
        assert_close(name, a, b, atol=5e-5, rtol=2e-5)


def test_triton_table_gradient_is_deterministic_and_reaches_only_used_buckets():
    """The table gradient is summed from per-program partials in a fixed order: two runs give the same bits; the
    buckets no pair falls in (keys farther than the window) get exactly 0."""
    xs, kpm = table_inputs(n_q=40, n_k=40)
    src = TABLE_SRC.format(mask="sliding(2)", causal="true", bias="t5_bias(rel, 16, 40, bidir)", cap="")
    g = torch.randn(2, 4, 40, 8, dtype=torch.float64)
    runs = [run_tables(src, "triton", xs, kpm, 0, g, bidir=False)[-1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    want = run_tables(src, "reference", xs, kpm, 0, g, bidir=False)[-1]
    assert_close("drel", runs[0], want, atol=5e-5, rtol=2e-5)
    assert bool((runs[0][:, 3:] == 0).all()) and bool((runs[0][:, :3] != 0).all())


def test_triton_tables_under_head_ranges():
    """Each stage reads and writes the table rows of its absolute heads."""
    src = """pattern split(heads: int = 4) {
        param rel[heads, 8]
        heads[0:2] attend softmax over sliding(3), bias = t5_bias(rel, 8, 20, true)
        heads[2:4] attend softmax over causal, bias = 0.5 * t5_bias(rel, 8, 20, false) - 0.1 * h
    }"""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 20, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    rel = torch.randn(4, 8, generator=g, dtype=torch.float64).requires_grad_()
    res = []
    for backend in ("reference", "triton"):
        out = pd.compile(src, backend=backend)(q, k, v, rel=rel)
        res.append([out, *torch.autograd.grad(out, (q, k, v, rel), torch.ones_like(out))])
    for name, a, b in zip(("out", "dq", "dk", "dv", "drel"), res[1], res[0]):
        assert_close(name, a, b, atol=5e-5, rtol=2e-5)


def test_three_table_terms_are_refused_with_the_reason():
    from patterndsl.backends import get_backend
    src = ("pattern t() { param a[2, 4]\n param b[2, 4]\n"
           " attend softmax, bias = t5_bias(a, 4) + t5_bias(b, 4) + t5_bias(a, 4, 9, false) }")
    why = get_backend("triton").supports(pd.compile(src).ir.stages[0], "cuda")
    assert "at most 2 bias tables in at most 2 terms, got 2 in 3" in why
