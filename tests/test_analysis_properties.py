"""Properties against brute force: empty rows for every N, exact pair and tile counts, future keys and the
causality of whole programs."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import patterndsl as pd
from patterndsl.analysis.checks import properties
from patterndsl.analysis.counting import pair_count, tile_counts
from patterndsl.analysis.primitives import profile
from patterndsl.analysis.rows import empty_rows
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.plan.layout import FULL, tile_layout

from analysis_strategies import analysis_masks

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(analysis_masks(free=False))
def test_empty_rows_for_every_n_match_brute_force(m):
    rows = empty_rows(m)
    if rows is None:                       # only outside the fragment (no `same`/`random` here)
        assert profile(m).reason, m
        return
    big = dense_mask(m, 90)
    for n in range(1, 90):
        empty = ~big[:n, :n].any(1)
        for i in range(n):
            assert rows.empty_at(i, n) == bool(empty[i]), (m, str(rows), i, n)


@SETTINGS
@given(analysis_masks(free=False))
def test_pair_counts_match_brute_force(m):
    q = pair_count(m)
    if q is None:
        return
    big = dense_mask(m, 100)
    for n in range(q.start, 100):
        assert q.at(n) == int(big[:n, :n].sum()), (m, str(q), n)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(analysis_masks(free=False))
def test_tile_counts_match_layouts(m):
    t = tile_counts(m, block=4)
    if t is None:
        return
    for tt in range(max(t.nonempty.start, t.full.start), 40):
        lay = tile_layout(m, 4 * tt, 4 * tt, 4, 4)
        assert t.nonempty.at(tt) == lay.nnz and t.full.at(tt) == int((lay.cls == FULL).sum()), (m, tt)


@pytest.mark.parametrize("mask,text", [
    ("sliding(2)", "none, for every N"),
    ("where(j < i)", "row 0: for every N"),
    ("where(j > i)", "every row: while N <= i + 1 (the last row)"),
    ("cols({5})", "rows 0..4: while N <= 5"),
    ("where(i % 2 == 0) & causal", "rows with i mod 2 = 1: for every N"),
    ("blocks(4) & where(j > i)", "rows with i mod 4 in {0, 1, 2}: while N <= i + 1 (the last row); "
                                 "rows with i mod 4 = 3: for every N"),
    ("where(j == i + 3) | cols({9})", "rows 0..6: while N <= i + 3 (the last 3 rows); rows 7..8: while N <= 9"),
    ("rows({3, 4})", "rows 0..2: for every N; rows i >= 5: for every N"),
])
def test_empty_rows_read_well(mask, text):
    from patterndsl.analysis.subjects import mask_expr
    assert str(empty_rows(mask_expr(mask))) == text


def test_exact_counts_of_builtins():
    assert str(pair_count(pd.compile("longformer").ir.stages[0].mask)) == "515*N - 66306 for N >= 257"
    assert str(pair_count(M.CAUSAL)) == "N**2/2 + N/2 for N >= 1"
    st = pd.compile("sparse_transformer").ir.stages[0].mask
    assert "depending on N % 128" in str(pair_count(st))
    t = tile_counts(pd.compile("sliding_window").ir.stages[0].mask)
    assert t.nonempty.short() == "65*T - 2080 (T >= 64)"


@pytest.mark.parametrize("name,causal,why", [
    ("luna_causal", True, ""), ("sparse_transformer", True, ""),
    ("examples/sink_window.attn", True, ""), ("examples/bigbird_causal.attn", True, ""),
    ("examples/document_mask.attn", True, ""), ("examples/window_favor_causal.attn", True, ""),
    ("longformer", False, "stage 1 lets a query see a later key (i=0, j=1 (N = 2))"),
    ("performer", False, "stage 1 lets a query see a later key"),
    ("luna", False, "stage out reads packed, and stage packed has param queries that read every token of input"),
    ("longformer_performer", False, "heads[0:4] stage 1 lets a query see a later key"),
    ("prefix_lm", False, "(i=0, j=1 (N = 2))"),
])
def test_causality_of_programs(name, causal, why):
    p = properties(name)
    assert p.causal == causal and why in p.why
    assert str(p).startswith(f"{p.name}: causal" if causal else f"{p.name}: not causal")


def test_causal_linear_and_nested_stages_from_the_ir():
    p = properties("performer", causal=True)
    assert p.causal and p.stages[0].future.holds and p.stages[0].future.proved
    assert properties("luna_causal").stages[0].causal is True


def test_op_properties_and_text():
    op = pd.compile("prefix_lm", prefix=4)
    text = str(op.properties())
    assert "allowed pairs: N**2/2 + N/2 + 6 for N >= 4" in text
    assert "density: 1/2 + 1/(2*N) + 6/N**2" in text
    assert "future keys: yes, first at i=0, j=1 (N = 2)" in text
    assert "tiles 64x64 at N = 64*T: nonempty T**2/2 + T/2 (T >= 1)" in text


def test_properties_outside_the_fragment_say_so():
    text = str(properties("bigbird"))
    assert "rows with no key: none, for every N" in text
    assert "allowed pairs: at most about" in text
    text = str(properties("where(i * j < 50) & causal", bound=64))
    assert "future keys: none, proved for every N" in text          # through its factor `causal`
    assert "not decided for every N" in text
    text = str(properties("where(i * j < 50) | causal", bound=64))
    assert "mask: not causal: stage mask lets a query see a later key (i=0, j=1 (N = 2))" in text
    text = str(properties("where(j <= 2 * i) & where(j <= i + 3)", bound=64))
    assert "mask: not causal" in text and "(i=1, j=2 (N = 3))" in text


@pytest.mark.parametrize("call,message", [
    (lambda: properties("longformer", bound=0), "the bound N of bounded checks must be an int in 1..65536, got 0"),
    (lambda: properties("longformer", block=0), "the tile size must be an int >= 1, got 0"),
    (lambda: properties("nosuch.attn"), "no such file: nosuch.attn"),
    (lambda: properties("longformer", windw=4), "unknown parameter 'windw' for pattern longformer"),
    (lambda: pd.compile("longformer").properties(bound=1 << 17), "must be an int in 1..65536"),
])
def test_property_errors(call, message):
    with pytest.raises(pd.PatternError) as e:
        call()
    assert message in str(e.value)


@pytest.mark.parametrize("module", ["affine", "bounded", "cases", "checks", "comparison", "contain", "counting",
                                    "hops", "intervals", "primitives", "profile", "receptive", "rows", "subjects"])
def test_doctests(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(f"patterndsl.analysis.{module}"))
    assert res.attempted > 0 and res.failed == 0
