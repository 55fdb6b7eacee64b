"""Mask inclusion and program comparison against brute force at small N."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patterndsl.analysis.contain import inclusion
from patterndsl.ir import mask as M
from patterndsl.ir.dense import dense_mask

from analysis_strategies import analysis_masks

BRUTE_N = 96


def _ids(assume: str, name: str, n: int):
    if f"same({name}) all distinct" in assume:
        return torch.arange(n)[None]
    return torch.zeros(1, n, dtype=torch.long)


def _dense(m, n, assume=""):
    names = M.runtime_inputs(m)
    runtime = {x: _ids(assume, x, n) for x in names}
    out = dense_mask(m, n, n, runtime)
    return out[0] if out.dim() == 3 else out


def _free(m):
    return {x for x in M.walk(m) if isinstance(x, (M.Same, M.Random))}


def _brute_missing(a, b, n, assume=""):
    bad = _dense(a, n, assume) & ~_dense(b, n, assume)
    return bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(analysis_masks(), analysis_masks())
def test_inclusion_agrees_with_brute_force(a, b):
    res = inclusion(a, b, bound=BRUTE_N)
    if res.holds:
        # no pair of a outside b at any size up to BRUTE_N, for any ids (all equal / all distinct cover a pair)
        for assume in ("", "same(x) all distinct same(y) all distinct", "same(x) all distinct", "same(y) all distinct"):
            sizes = [BRUTE_N] if not any(isinstance(x, M.Random) for x in _free(a) | _free(b)) else range(1, 40)
            for n in sizes:
                assert not _brute_missing(a, b, n, assume).any(), (a, b, n, assume)
    else:
        p = res.missing
        bad = _brute_missing(a, b, p.n, p.assume)
        assert bad[p.i, p.j], (a, b, p)
        # the first one: nothing smaller at this size in (max(i, j), i, j) order
        ii, jj = bad.nonzero(as_tuple=True)
        key = torch.maximum(ii, jj) * 10**6 + ii * 10**3 + jj
        k = int(key.argmin())
        assert (int(ii[k]), int(jj[k])) == (p.i, p.j)


@settings(max_examples=200, deadline=None)
@given(analysis_masks(free=False), analysis_masks(free=False))
def test_fragment_masks_are_decided_for_every_n(a, b):
    res = inclusion(a, b)
    prof_reason = res.reason
    if prof_reason is None:
        assert res.proved or not res.holds
