"""The op's fast path (`op/fast.py`) and the per-lowering fit factors of the cost model.

A call like an earlier checked one runs a prepared callable: it must still give the fp64 reference's answer
for new values, honour a changed padding mask and a new offset, plan again for a new shape, dtype, grad mode
or pin, and keep every error. The fit factors (`fit.<lowering>`, `fit.bwd.<lowering>`) move the choice as
injected constants say, forward and forward+backward apart; nothing here is timed."""
import pytest
import torch

import patterndsl as pd
from patterndsl.backends import declare_all
from patterndsl.errors import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.program import Softmax, Stage
from patterndsl.plan import calibrate as C
from patterndsl.plan.lowering import Problem
from patterndsl.plan.model import FIT_MAX, Constants, predict
from patterndsl.plan.select import candidates, choose, pin

from oracles import softmax_attention

declare_all()
SOFTMAX_LOWERINGS = ("torch.dense", "torch.pieces/bm256", "torch.blocksparse/64x64", "reference.softmax")


def _tensors(g, n, dtype=torch.float64, heads=2, kv_heads=2, grad=False):
    q = torch.randn(2, heads, n, 8, generator=g, dtype=dtype)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=g, dtype=dtype) for _ in range(2))
    return [x.requires_grad_(grad) for x in (q, k, v)]


def _want(op, q, k, v, kpm=None, offset=0):
    allowed = op.mask(q.shape[2], k.shape[2], q_offset=offset)
    return softmax_attention(*(x.double() for x in (q, k, v)), allowed, key_padding_mask=kpm)


@pytest.mark.parametrize("name", SOFTMAX_LOWERINGS)
def test_repeated_calls_give_the_reference_for_new_values(name):
    op = pd.compile("longformer", window=3)
    g = torch.Generator().manual_seed(0)
    with pin(name):
        for _ in range(3):                       # the first call checks; the next two take the fast path
            q, k, v = _tensors(g, 20)
            assert (op(q, k, v) - _want(op, q, k, v)).abs().max() <= 1e-10
        assert len(op._ready) == 1
        for n, dtype in ((20, torch.float32), (33, torch.float64), (7, torch.float64)):   # new keys
            q, k, v = _tensors(g, n, dtype)
            got = op(q, k, v)
            assert got.dtype == dtype and (got.double() - _want(op, q, k, v)).abs().max() <= (1e-5 if dtype ==
                                                                                                torch.float32 else 1e-10)
        assert len(op._ready) == 4


@pytest.mark.parametrize("name", SOFTMAX_LOWERINGS)
def test_fast_path_honours_padding_values_and_offsets(name):
    op = pd.compile("longformer", window=3)
    g = torch.Generator().manual_seed(1)
    q, k, v = _tensors(g, 16)
    with pin(name):
        for trial in range(3):                   # same key (a padding mask [2, 16]), different padded keys
            kpm = torch.zeros(2, 16, dtype=torch.bool)
            kpm[trial % 2, 3 + trial:9 + trial] = True
            k2 = k.clone()
            k2[kpm[:, None, :, None].expand_as(k2)] = float("nan")       # padded keys may hold anything
            got = op(q, k2, v, key_padding_mask=kpm)
            assert torch.isfinite(got).all() and (got - _want(op, q, k, v, kpm)).abs().max() <= 1e-10
        for offset in (0, 5, 9, 5):              # a new offset is a new key; a seen one is prepared already
            qs = q[:, :, :7]
            got = op(qs, k, v, q_offset=offset)
            assert (got - _want(op, qs, k, v, offset=offset)).abs().max() <= 1e-10


def test_fast_path_gradients_and_grad_mode_equal_the_reference():
    op = pd.compile("prefix_lm", prefix=4)
    g = torch.Generator().manual_seed(2)
    for name in ("torch.dense", "torch.pieces/bm256", "torch.blocksparse/256x64"):
        with pin(name):
            for _ in range(2):
                q, k, v = _tensors(g, 18, grad=True)
                do = torch.randn(2, 2, 18, 8, generator=g, dtype=torch.float64)
                got = torch.autograd.grad(op(q, k, v), (q, k, v), do)
                want = torch.autograd.grad(_want(op, q, k, v), (q, k, v), do)
                for a, b in zip(got, want):
                    assert (a - b).abs().max() <= 1e-10, name
                with torch.no_grad():            # no grad recorded: a key of its own, the same answer
                    assert not op(q, k, v).requires_grad
    grads = {key[11] for key in op._ready}
    assert grads == {True, False}


def test_grouped_heads_and_a_shape_change_re_plan():
    op = pd.compile("sliding_window", window=2)
    g = torch.Generator().manual_seed(3)
    for heads, kv in ((4, 2), (4, 2), (4, 1), (4, 4)):
        q, k, v = _tensors(g, 12, heads=heads, kv_heads=kv)
        assert (op(q, k, v) - _want(op, q, k, v)).abs().max() <= 1e-10
    assert len(op._ready) == 3


def test_fast_path_keeps_every_error():
    op = pd.compile("longformer", window=3)
    g = torch.Generator().manual_seed(4)
    q, k, v = _tensors(g, 10)
    op(q, k, v)
    with pytest.raises(PatternError, match="key_padding_mask must be a bool tensor"):
        op(q, k, v, key_padding_mask=torch.zeros(2, 10))
    with pytest.raises(PatternError, match=r"key_padding_mask must be \[2, 10\]"):
        op(q, k, v, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(PatternError, match="q_offset must be >= 0"):
        op(q, k, v, q_offset=-1)
    with pytest.raises(PatternError, match="unexpected input 'x'"):
        op(q, k, v, x=1)
    with pytest.raises(PatternError, match="share a dtype"):
        op(q, k.float(), v)
    with pytest.raises(PatternError, match="must be a torch.Tensor"):
        op(q, k.tolist(), v)


def test_a_new_calibration_or_pin_re_plans_the_fast_path():
    op = pd.compile("longformer", window=3)
    q, k, v = _tensors(torch.Generator().manual_seed(5), 24, torch.float32)
    with pin("torch.dense"):
        op(q, k, v)
        op(q, k, v)
    with pin("torch.blocksparse/64x64"):
        op(q, k, v)
    with C.use_constants({"call": 1.0}):
        op(q, k, v)
    assert len(op._ready) == 3
    assert {"torch.dense", "torch.blocksparse/64x64"} <= {lw.name for lw in op._fast.values()}


# ---------------------------------------------------------------------------------------------- fit factors
def _problem(grad, n=1024):
    stage = Stage("out", Softmax(), M.Union((M.Band(0, None, 1), M.Cols(frozenset(range(64))))))
    return Problem(stage, 1, 4, n, n, 64, 64, grad=grad)


def test_fit_factors_scale_one_lowerings_prediction():
    plain = {c.lowering.name: c.prediction for c in candidates(_problem(True), consts=Constants.of({}))
             if c.prediction}
    fitted = {c.lowering.name: c.prediction
              for c in candidates(_problem(True), consts=Constants.of({"fit.bwd.torch.dense": 3.0,
                                                                      "fit.torch.dense": 100.0}))
              if c.prediction}
    assert fitted["torch.dense"].seconds == pytest.approx(3.0 * plain["torch.dense"].seconds)
    for name in plain:                           # the forward factor does not touch a forward+backward plan
        if name != "torch.dense":
            assert fitted[name].seconds == plain[name].seconds
    c = Constants.of({"fit.torch.dense": 1e6, "fit.bwd.torch.dense": 1e-6})
    assert c.fit("torch.dense", False) == FIT_MAX and c.fit("torch.dense", True) == 0.5
    assert c.fit("torch.pieces/bm256", True) == 1.0


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_choice_follows_the_backward_fit_per_lowering(grad):
    names = ("torch.dense", "torch.pieces/bm256", "torch.blocksparse/256x64", "torch.blocksparse/64x64")
    prefix = "fit.bwd." if grad else "fit."
    for winner in names:                          # the lowest factor for one, the highest for the others
        values = {f"{prefix}{n}": (0.5 if n == winner else FIT_MAX) for n in names}
        values.update({"flex": 1.0, "ref": 1.0})
        with C.use_constants(values):
            assert choose(_problem(grad)).chosen.name == winner
        other = "fit." if grad else "fit.bwd."    # the other mode's factors change nothing here
        with C.use_constants({other + k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}):
            assert choose(_problem(grad)).chosen.name == choose(_problem(grad), consts=Constants.of({})).chosen.name


def test_predict_applies_the_fit_to_every_per_call_term():
    from patterndsl.plan.lowering import Work
    w = Work.of({"call": 2, "flash.64": 1e6}, once={"flex.compile": 1})
    c = Constants.of({"call": 1e-5, "flash.64": 1e-9, "flex.compile": 10.0})
    p1, p2 = predict(w, c), predict(w, c, fit=2.0)
    assert p2.seconds == pytest.approx(2 * p1.seconds) and p2.once == p1.once
