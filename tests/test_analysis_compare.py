"""Mask inclusion and program comparison against brute force at small N, and their error messages."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.analysis.comparison import compare
from patterndsl.analysis.contain import inclusion, sizes_to_check
from patterndsl.analysis.subjects import mask_expr
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask

from analysis_strategies import analysis_masks, scaled

BRUTE_N = 64


def _dense(m, n, assume=""):
    runtime = {x: (torch.arange(n)[None] if f"same({x}) all distinct" in assume
                   else torch.zeros(1, n, dtype=torch.long)) for x in M.runtime_inputs(m)}
    out = dense_mask(m, n, n, runtime)
    return out[0] if out.dim() == 3 else out


def _reads_n(*masks):
    return any(isinstance(x, M.Random) for m in masks for x in M.walk(m))


def _check(a, b, res, n_max):
    if res.holds:
        sizes = range(1, 40) if _reads_n(a, b) else [n_max]
        names = sorted({x.name for m in (a, b) for x in M.walk(m) if isinstance(x, M.Same)})
        assumptions = [" ".join(f"same({x}) all distinct" for x, on in zip(names, bits) if on)
                       for bits in itertools.product((False, True), repeat=len(names))]
        for assume in assumptions:
            for n in sizes:
                assert not (_dense(a, n, assume) & ~_dense(b, n, assume)).any(), (a, b, n, assume)
        return
    p = res.missing
    bad = _dense(a, p.n, p.assume) & ~_dense(b, p.n, p.assume)
    assert bad[p.i, p.j], (a, b, p)
    ii, jj = bad.nonzero(as_tuple=True)
    k = int((torch.maximum(ii, jj) * 10**6 + ii * 10**3 + jj).argmin())
    assert (int(ii[k]), int(jj[k])) == (p.i, p.j), "not the first missing pair"
    if not _reads_n(a, b):
        assert p.n == max(p.i, p.j) + 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(analysis_masks(), analysis_masks())
def test_inclusion_agrees_with_brute_force(a, b):
    _check(a, b, inclusion(a, b, bound=BRUTE_N), BRUTE_N)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(analysis_masks(free=False), analysis_masks(free=False), st.sampled_from([3, 5]))
def test_proofs_see_past_small_sizes(a, b, k):
    """The same shapes k times further out: a proof for every N must still agree with brute force."""
    a, b = scaled(a, k), scaled(b, k)
    res = inclusion(a, b, bound=BRUTE_N * k)
    _check(a, b, res, BRUTE_N * k)


@settings(max_examples=20, deadline=None)
@given(analysis_masks(free=False), analysis_masks(free=False))
def test_the_fragment_is_decided_for_every_n(a, b):
    res = inclusion(a, b)
    assert res.proved or not res.holds or res.reason


@pytest.mark.parametrize("a,b,verdict", [
    ("causal", "where(j <= i)", "equal"),
    ("sliding(1) | sliding(2)", "sliding(2)", "equal"),
    ("window(3, 0)", "causal", "A within B"),
    ("global({0, 5})", "rows({0, 5}) | cols({0, 5})", "equal"),
    ("blocks(8)", "where(i // 8 == j // 8)", "equal"),
    ("strided(4)", "where((i - j) % 4 == 0)", "equal"),
    ("sliding(3, 2)", "strided(2) & sliding(6)", "equal"),
    ("where(abs(i // 16 - j // 16) <= 1)", "sliding(31)", "A within B"),
    ("causal - sliding(2)", "~window(2, 2)", "A within B"),
    ("~(sliding(2) | global({3}))", "~sliding(2) & ~rows({3}) & ~cols({3})", "equal"),
    ("where(j % 8 >= 6) & causal", "causal & cols({6, 7, 14, 15})", "B within A"),
    ("sliding(4) & same(doc)", "sliding(4)", "A within B"),
    ("where(i >= 100 and j < 3)", "cols({0, 1, 2}) - rows(range(0, 100))", "equal"),
    ("sliding(5)", "window(5, 0) | window(0, 6)", "A within B"),
    ("sliding(5)", "window(5, 0) | cols({7})", "neither"),
])
def test_the_examples(a, b, verdict):
    res = compare(a, b)
    assert res.verdict == verdict and res.proved, str(res)


def test_a_counterexample_is_the_first_pair():
    res = compare("window(3, 0)", "causal")
    assert res.b_not_a[1].i == 4 and res.b_not_a[1].j == 0 and res.b_not_a[1].n == 5
    assert "in B, not in A: i=4, j=0 (N = 5)" in str(res)


def test_runtime_ids_counterexample_names_the_ids():
    res = compare("sliding(3)", "same(doc) | sliding(2)")
    assert res.verdict == "neither"
    assert "in A, not in B: i=0, j=3 (N = 4, ids of same(doc) all distinct)" in str(res)
    assert "in B, not in A: i=0, j=4 (N = 5, ids of same(doc) all equal)" in str(res)


def test_outside_the_fragment_is_checked_up_to_the_bound():
    res = compare("where(j <= 2 * i)", "where(j <= 2 * i) | causal", bound=200)
    assert res.verdict == "equal" and not res.proved
    assert "checked for N <= 200" in str(res) and "mixes i and j" in str(res)
    res = compare("where(j <= 2 * i)", "causal")
    assert res.verdict == "B within A" and res.a_not_b[1].n == 3           # a counterexample is a proof


def test_a_part_in_the_fragment_decides():
    assert compare("where(i * j < 40) & causal", "where(i * j < 40)").proved
    res = compare("sliding(2)", "sliding(2) | where(i * j < 9)")
    assert res.verdict == "A within B" and res.proved
    res = compare("where(i * j < 40)", "where(i * j < 40) | causal", bound=64)    # A is a part of B
    assert res.verdict == "A within B" and res.proved
    res = compare("where(i * j < 40)", "where(i * j < 41) | sliding(1)", bound=64)
    assert res.verdict == "A within B" and not res.proved and "checked for N <= 64" in str(res)


def test_random_draws_are_free_for_proofs_and_checked_per_size():
    res = compare("random(2, 4, 0) | sliding(2)", "random(2, 4, 0) | sliding(3)")
    assert res.verdict == "A within B" and res.proved
    res = compare("random(2, 4, 0)", "random(2, 4, 1)", bound=100)
    assert res.verdict == "neither"
    assert sizes_to_check([M.Random(1, 2, 0)], 300)[1] == "N = 1..64, 128, 256, 300"


def test_programs_compare_stage_by_stage_and_head_by_head():
    res = compare("longformer", "longformer", params_b={"window": 256})
    assert res.verdict == "B within A" and res.proved
    res = compare("examples/longformer_performer_heads.attn", "longformer_performer",
                  params_b={"window": 256, "features": 128})
    assert res.verdict == "equal" and [p.label for p in res.parts] == ["heads[0:4]", "heads[4:8]"]
    res = compare("examples/window_favor_causal.attn", "examples/window_favor_causal.attn",
                  params_a={"near": 2}, params_b={"near": 2, "window": 64})
    assert res.verdict == "B within A"
    res = compare("luna", "luna")
    assert res.verdict == "equal" and len(res.parts) == 2
    res = compare("sliding_window", "window(4095, 0)")
    assert res.verdict == "equal"


@pytest.mark.parametrize("a,b,pa,pb,message", [
    ("luna", "longformer", {}, {}, "cannot compare luna and longformer: 2 stage(s) against 1"),
    ("performer", "longformer", {}, {}, "stage 1 is `attend linear(favor(256, orthogonal = true, scaling = 0, eps = 0.0001, seed = 0, redraw = 0))` in "
     "performer, `attend softmax` in longformer"),
    ("longformer_performer", "longformer_performer", {}, {"num_heads": 6, "local_heads": 3},
     "8 heads against 6"),
    ("longformer_performer", "longformer_performer", {}, {"local_heads": 2}, "heads[2:4] are `attend softmax` in longformer_performer, `attend linear(favor(256"),
    ("luna", "sliding(2)", {}, {}, "luna has 2 stages, the other side is one mask"),
    ("luna", "luna", {}, {"length": 8}, "stage packed reads queries from param p[16] in luna, from param p[8] in luna"),
    ("sliding(2)", "causal", {"window": 3}, {}, "parameters window given for a value that takes none"),
    ("nosuch.attn", "causal", {}, {}, "no such file: nosuch.attn"),
    ("slidng(2)", "causal", {}, {}, "<mask>:1:1: error: unknown function 'slidng'"),
    ("sliding(2) |", "causal", {}, {}, "<mask>:1:13: error: the mask expression ends too early"),
    ("longformer", "longformer", {"windw": 3}, {}, "unknown parameter 'windw' for pattern longformer"),
])
def test_comparison_errors(a, b, pa, pb, message):
    with pytest.raises(pd.PatternError) as e:
        compare(a, b, params_a=pa, params_b=pb)
    assert message in str(e.value)


@pytest.mark.parametrize("bound", [0, -1, 1 << 20, 2.5, True])
def test_bound_out_of_range(bound):
    with pytest.raises(pd.PatternError, match="the bound N of bounded checks must be an int in 1..65536"):
        compare("causal", "causal", bound=bound)


def test_compare_takes_ops_ir_and_masks():
    op = pd.compile("longformer", window=8)
    assert compare(op, op.ir).verdict == "equal"
    assert compare(op, M.sliding(4) | M.global_({0})).verdict == "equal"
    assert pd.compare(M.CAUSAL, mask_expr("where(j <= i)")).verdict == "equal"
    with pytest.raises(pd.PatternError, match="expected a mask, a program, an op"):
        compare(3, "causal")
