"""Receptive fields against dense boolean matrix products at small N (random masks and programs included)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterndsl as pd
from patterndsl.analysis.hops import image, image_runs
from patterndsl.analysis.intervals import band_runs, runs, to_bits
from patterndsl.analysis.receptive import band_depth, reach
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask
from patterndsl.ir.program import INPUT

from analysis_strategies import analysis_masks
from test_layout import rich_masks

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _no_ids(m):
    return not M.runtime_inputs(m)


@SETTINGS
@given(analysis_masks().filter(_no_ids), st.integers(1, 70), st.integers(1, 70), st.data())
def test_one_hop_is_the_dense_row_union(m, n_q, n_k, data):
    q = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_q, max_size=n_q)))
    want = (dense_mask(m, n_q, n_k) & q[:, None]).any(0)
    assert torch.equal(image(m, q, n_k), want)
    assert torch.equal(to_bits(*image_runs(m, *runs(q), n_q, n_k), n_k), want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rich_masks(), st.integers(1, 70), st.integers(1, 70), st.data())
def test_one_hop_on_the_layout_tests_masks(m, n_q, n_k, data):
    q = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_q, max_size=n_q)))
    assert torch.equal(image(m, q, n_k), (dense_mask(m, n_q, n_k) & q[:, None]).any(0))


@SETTINGS
@given(st.integers(1, 60), st.integers(1, 60), st.one_of(st.none(), st.integers(-12, 12)),
       st.one_of(st.none(), st.integers(-12, 12)), st.integers(1, 5), st.data())
def test_band_hops_on_runs(n_q, n_k, lo, hi, step, data):
    m = M.band(lo, hi, step)
    if not isinstance(m, M.Band):
        return
    q = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n_q, max_size=n_q)))
    got = band_runs(*runs(q), m.lo, m.hi, m.step, n_k)
    assert torch.equal(to_bits(*got, n_k), (dense_mask(m, n_q, n_k) & q[:, None]).any(0))


def _dense_dependence(ir, n):
    """Which input tokens each output row reads, from dense masks: the definition `reach` must match."""
    dep = {INPUT: torch.eye(n, dtype=torch.bool)}
    for name, length in ir.params:
        dep[name] = torch.zeros(length, n, dtype=torch.bool)
    for st_ in ir.stages:
        q_dep, k_dep = dep[st_.query], dep[st_.keys]
        mask = dense_mask(st_.mask, q_dep.shape[0], k_dep.shape[0])
        dep[st_.name] = q_dep | ((mask.double() @ k_dep.double()) > 0)
    outs = [dep[o] for o in ir.outputs if dep[o].shape[0] == n]
    return torch.stack(outs).any(0)


def _dense_fields(layers, n, q, residual=True):
    """F_l = e_q D_l ... D_1 with D = dependence (| I with the residual stream)."""
    mats = []
    for x in layers:
        d = dense_mask(x, n) if isinstance(x, M.Mask) else _dense_dependence(x, n)
        mats.append(d | torch.eye(n, dtype=torch.bool) if residual else d)
    out = []
    for l in range(1, len(mats) + 1):
        f = torch.zeros(n, dtype=torch.bool)
        f[q] = True
        for d in reversed(mats[:l]):
            f = (f.double() @ d.double()) > 0
        out.append(f)
    return out


@SETTINGS
@given(st.lists(analysis_masks().filter(_no_ids), min_size=1, max_size=3), st.integers(1, 48), st.data(),
       st.booleans(), st.booleans())
def test_fields_match_dense_products(masks, n, data, residual, repeat):
    q = data.draw(st.integers(0, n - 1))
    layers = masks[:1] * 4 if repeat else masks
    r = reach(layers[0] if repeat else layers, layers=len(layers), n=n, query=q, residual=residual)
    want = _dense_fields(layers, n, q, residual)
    for l, f in enumerate(want, 1):
        assert torch.equal(r.keys(l), f), (l, layers)
    first = next((l for l, f in enumerate(want, 1) if f[0]), None)
    if first is not None or q == 0:
        assert r.depth == (0 if q == 0 else first)


@pytest.mark.parametrize("name,params", [
    ("luna", {}), ("luna_causal", {}), ("longformer_performer", {"window": 6, "num_heads": 4, "local_heads": 2}),
    ("bigbird", {"block": 4, "window": 3, "globals": 1, "random_blocks": 1}), ("sparse_transformer", {"stride": 5}),
    ("sparse_transformer", {"stride": 4, "variant": "fixed", "summary": 2}), ("prefix_lm", {"prefix": 3}),
])
def test_program_fields_match_dense_products(name, params):
    ir = pd.compile(name, **params).ir
    n = 40
    for q in (0, 17, n - 1):
        r = reach(name, layers=3, n=n, query=q, **params)
        for l, f in enumerate(_dense_fields([ir] * 3, n, q), 1):
            assert torch.equal(r.keys(l), f), (name, q, l)


def test_chained_positional_stages():
    text = """pattern chain() {
        a = attend softmax over window(2, 0)
        b = attend softmax query a keys a over window(0, 3)
        return b
    }"""
    ir = pd.parse(text).lower()
    r = reach(text, layers=2, n=30, query=12)
    for l, f in enumerate(_dense_fields([ir] * 2, 30, 12), 1):
        assert torch.equal(r.keys(l), f)


def test_longformer_argument_in_numbers():
    """l layers of a one-sided window w reach l*w tokens back; dilation d reaches l*d*w (one position
    in d), at N = 1M in closed form."""
    w, d, n = 256, 4, 1 << 20
    plain = reach(f"sliding({w})", layers=6, n=n)
    dilated = reach(f"sliding({w}, {d})", layers=6, n=n)
    for l in range(1, 7):
        assert plain.span(l) == (n - 1 - l * w, n - 1)
        assert dilated.span(l) == (n - 1 - l * d * w, n - 1)
        assert dilated.count(l) == l * w + 1
    assert plain.depth == -(-(n - 1) // w)
    assert dilated.depth is None and "never" in dilated.depth_note     # n - 1 is not a multiple of 4


def test_million_tokens_through_every_builtin():
    for name in pd.builtins():
        r = reach(name, layers=2, n=1 << 20)
        assert r.count(1) >= 1 and r.count(2) >= r.count(1)


@pytest.mark.parametrize("band,q,want", [(M.sliding(3), 10, 4), (M.window(4, 0), 8, 2), (M.sliding(2, 3), 9, 2),
                                         (M.sliding(2, 3), 10, None), (M.band(1, 5), 9, 2), (M.band(-4, -1), 5, None),
                                         (M.band(0, None), 7, 1)])
@pytest.mark.parametrize("residual", [True, False])
def test_band_depth_closed_form_matches_iteration(band, q, want, residual):
    assert band_depth(band, q) == want
    dense = _dense_fields([band] * 12, q + 1, q, residual)
    first = next((l for l, f in enumerate(dense, 1) if f[0]), None)
    assert first == want
    r = reach(band, layers=1, n=q + 1, query=q, residual=residual)
    assert r.depth == want


def test_gapped_band_is_iterated_not_closed_form():
    r = reach(M.band(6, 9, 3), layers=1, n=10)          # offsets {0, 6, 9}: 9 - 9 = 0 at once
    assert r.depth == 1 and "closed form" not in r.depth_note
    r = reach(M.band(6, 9, 3), layers=1, n=13)          # 12 = 6 + 6: two layers
    assert r.depth == 2


def test_depth_without_the_residual_stream_notices_cycles():
    r = reach("sliding(1) - sliding(0)", layers=1, n=6, query=4, residual=False)
    assert r.depth == 4                                          # {3, 5}, {2, 4}, {1, 3, 5}, {0, 2, 4}
    r = reach("blocks(2) - sliding(0)", layers=1, n=6, query=3, residual=False)      # 3 -> 2 -> 3 -> ...
    assert r.depth is None and "its field repeats after 2 layers" in r.depth_note
    r = reach("window(0, 1) - sliding(0)", layers=1, n=6, query=4, residual=False)   # 4 -> 5 -> nothing
    assert r.depth is None and "stops growing" in r.depth_note


def test_depth_by_iteration_and_fixed_point():
    r = reach("where(abs(i - j) <= 2 and (i - j) % 2 == 0) | where(abs(i - j) == 1)", layers=1, n=40)
    assert r.depth == 20 and "after 20 layers" in r.depth_note        # by iteration (not a single band)
    r = reach("blocks(4)", layers=2, n=40)
    assert r.depth is None and "stops growing" in r.depth_note


def test_runtime_ids_are_required_and_used():
    with pytest.raises(pd.PatternError, match="reads runtime ids segments: reach needs them"):
        reach("same(segments) & causal", layers=2, n=8)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    r = reach("same(segments) & causal", layers=2, n=8, query=5, runtime={"segments": ids})
    assert r.keys(2).nonzero().flatten().tolist() == [3, 4, 5]


@pytest.mark.parametrize("call,message", [
    (lambda: reach("sliding(2)", layers=0, n=8), "layers must be an int >= 1, got 0"),
    (lambda: reach(["sliding(2)", "causal"], layers=3, n=8), "2 patterns for 3 layers"),
    (lambda: reach("sliding(2)", n=0), "the sequence length N must be an int in 1..16777216, got 0"),
    (lambda: reach("sliding(2)", n=1 << 30), "must be an int in 1..16777216"),
    (lambda: reach("sliding(2)", n=8, query=8), "the query must be a token index in 0..7, got 8"),
    (lambda: reach([], n=8), "reach needs at least one pattern"),
    (lambda: reach("nosuch.attn", n=8), "no such file: nosuch.attn"),
    (lambda: reach("luna", n=8, length=0), "param 'p' must have at least 1 row"),
])
def test_reach_errors(call, message):
    with pytest.raises(pd.PatternError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_text_picture():
    text = str(reach("sliding(1)", layers=2, n=8, query=4))
    assert "reach of query 4 (N = 8), 2 layers, residual stream included" in text
    assert "...###.." in text and "..#####." in text
    assert "query 4 reads token 0 after 4 layers (closed form for sliding(1))" in text
