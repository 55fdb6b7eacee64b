"""The planner: linear and nested lowerings equal the reference; the choice follows the predicted costs under
injected constants (nothing is timed); choices are cached by shape class and never stale; calibration is
cached on disk per device and versions; explain lists every candidate; errors name what went wrong."""
import json

import pytest
import torch

import patterndsl as pd
from patterndsl.backends import declare_all
from patterndsl.backends.reference.features import draw_projection
from patterndsl.backends.reference.linear import linear_attention
from patterndsl.backends.reference.nested import nested_attention
from patterndsl.errors import PatternError
from patterndsl.ir import mask as M
from patterndsl.ir.program import Elu1, Favor, Linear, ReluFeatures, Softmax, Stage
from patterndsl.plan import calibrate as C
from patterndsl.plan.lowering import Problem, Work, declared, lowering
from patterndsl.plan.model import Constants, predict
from patterndsl.plan.select import candidates, choose, pin

declare_all()


def _grads(fn, tensors, do):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [x.grad for x in leaves]


# ------------------------------------------------------------------------------------- linear and nested
@pytest.mark.parametrize("fm", [Favor(16, eps=1e-3), ReluFeatures(8), Elu1()], ids=["favor", "relu", "elu1"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", [lw.name for lw in declared("linear", "torch")])
def test_linear_lowerings_equal_the_reference_fp64(name, fm, causal):
    stage = Stage("out", Linear(fm), M.CAUSAL if causal else M.FULL)
    w = None if isinstance(fm, Elu1) else draw_projection(fm, 8)
    g = torch.Generator().manual_seed(7)
    for n_q, n_k, pad in ((13, 13, False), (21, 9, True), (9, 21, True), (1, 1, False)):
        q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (n_q, n_k, n_k))
        do = torch.randn(2, 3, n_q, 8, generator=g, dtype=torch.float64)
        kpm = None
        if pad:
            kpm = torch.rand(2, n_k, generator=g) < 0.3
            kpm[1, :4] = True
        lw = lowering(name)
        if lw.applies(Problem(stage, 2, 3, n_q, n_k, 8, 8, torch.float64, torch.device("cpu"), pad, True)):
            return
        want = _grads(lambda a, b, c: linear_attention(a, b, c, fm, w, causal=causal, key_padding_mask=kpm),
                      (q, k, v), do)
        got = _grads(lambda a, b, c: lw.run(stage, a, b, c, projection=w, key_padding_mask=kpm), (q, k, v), do)
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-10, f"{name} {what} N={n_q}x{n_k}"


@pytest.mark.parametrize("name", [lw.name for lw in declared("nested", "torch")])
def test_nested_lowerings_equal_the_reference_fp64(name):
    stage = pd.compile("luna_causal", length=5).ir.stages[0]
    g = torch.Generator().manual_seed(3)
    for n, pad in ((37, False), (70, True), (1, False)):
        q, k, v, c = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(4))
        p = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
        do = torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64)
        kpm = (torch.rand(2, n, generator=g) < 0.3) if pad else None
        want = _grads(lambda *a: nested_attention(*a, key_padding_mask=kpm), (q, k, v, p, c), do)
        got = _grads(lambda a, b, cc, pp, ck: lowering(name).run(stage, a, b, cc, p=pp, c=ck, key_padding_mask=kpm),
                     (q, k, v, p, c), do)
        for what, a, b in zip(("out", "dq", "dk", "dv", "dp", "dc"), got, want):
            assert (a - b).abs().max() <= 1e-10, f"{name} {what} N={n}"


# ------------------------------------------------------------------------------------- choice and costs
def _problem(mask, n=4096, grad=False, padded=False):
    return Problem(Stage("out", Softmax(), mask), 1, 4, n, n, 64, 64, grad=grad, padded=padded)


def test_choice_is_the_lowest_predicted_score_up_to_the_model_error():
    """The cheapest prediction wins; within TIE of it, the candidate with the fewest kernel calls."""
    from patterndsl.plan.select import TIE
    for mask in (M.sliding(256) | M.global_({0}), M.CAUSAL, pd.compile("bigbird").ir.stages[0].mask):
        for n in (1024, 4096):
            choice = choose(_problem(mask, n), "auto")
            viable = [c for c in choice.candidates if c.why_not is None and not c.lowering.last_resort]
            best = min(c.prediction.score for c in viable)
            ties = [c for c in viable if c.prediction.score <= TIE * best]
            assert choice.prediction.score <= TIE * best
            assert choice.candidates[[c.lowering for c in choice.candidates].index(choice.chosen)].work.term("call") \
                == min(c.work.term("call") for c in ties)


def test_choice_follows_injected_constants():
    """Make one kind of work expensive and the choice moves to the lowering that avoids it."""
    band = M.sliding(256) | M.global_({0})
    with C.use_constants({"flash.mask": 1e-3}):          # masks ruinous: a causal mask takes is_causal
        assert choose(_problem(M.CAUSAL), "auto").chosen.name == "torch.causal"
    with C.use_constants({"flash.mask": 0.0, "flash.64": 1.0, "flash.32": 1.0, "flash.256": 1.0, "flex": 1e-12,
                          "flex.compile": 0.0}):
        assert choose(_problem(band), "auto").chosen.name == "torch.flex"        # only Flex is cheap
    with C.use_constants({"flex.compile": 1e6}):                                # a compile never pays off
        assert choose(_problem(band), "auto").chosen.name != "torch.flex"
    with C.use_constants({"ref": 0.0, "call": 1.0}):     # the reference is never auto's choice while another applies
        assert not choose(_problem(band), "auto").chosen.last_resort


def test_requested_backend_pins_the_backend_and_reference_is_last_resort():
    assert choose(_problem(M.sliding(4)), "reference").chosen.name == "reference.softmax"
    assert choose(_problem(M.sliding(4)), "torch").chosen.backend == "torch"
    meta = Problem(Stage("out", Softmax(), M.sliding(4)), 1, 4, 64, 64, 64, 64, device=torch.device("meta"))
    with pytest.raises(PatternError, match="no lowering can run stage out on meta with backend 'triton'") as e:
        choose(meta, "triton")
    assert "triton.softmax: Triton kernels do not run on meta devices" in str(e.value)


def test_pin_forces_and_explains():
    with pin("torch.blocksparse/64x64"):
        assert choose(_problem(M.sliding(8)), "auto").chosen.name == "torch.blocksparse/64x64"
    with pin("torch.causal"), pytest.raises(PatternError, match="pinned lowering torch.causal cannot run stage "
                                                                "out: the mask is not exactly causal"):
        choose(_problem(M.sliding(8)), "auto")
    with pytest.raises(KeyError, match="no lowering 'torch.nope'; declared: "):
        with pin("torch.nope"):
            pass


def test_work_counts_the_computed_not_the_useful_pairs():
    """A dilated band through residue classes computes windows of its classes; tiles compute far more."""
    p = _problem(pd.compile("dilated_window").ir.stages[0].mask, n=16384)
    works = {c.lowering.name: c.work for c in candidates(p) if c.work is not None}
    pieces = sum(n for t, n in works["torch.pieces/bm64"].counts if t.startswith("flash.") and "mask" not in t)
    tiles = sum(n for t, n in works["torch.blocksparse/64x64"].counts if t.startswith("flash.") and "mask" not in t)
    assert tiles > 1.5 * pieces


def test_predict_and_missing_constant():
    c = Constants.of({"call": 1e-5, "flash.64": 1e-9})
    assert predict(Work.of({"call": 2, "flash.64": 1e6}), c).seconds == pytest.approx(1.02e-3)
    assert predict(Work.of({"flash.64": 1e6}), c, torch.float64).seconds == pytest.approx(2e-3)
    with pytest.raises(KeyError, match="the cost model has no constant for 'warp'"):
        predict(Work.of({"warp": 1}), c)


# ------------------------------------------------------------------------------------------------ cache
def test_op_chooses_once_per_shape_class(monkeypatch):
    from patterndsl.plan import select
    calls = []
    original = select.choose

    def counting(*a, **kw):
        calls.append(a[0].n_q)
        return original(*a, **kw)
    monkeypatch.setattr(select, "choose", counting)
    op = pd.compile("longformer", window=8)
    for n in (100, 120, 127, 100, 200):                 # 65..128 share a bucket (but for 128's alignment)
        op(*(torch.randn(1, 2, n, 8) for _ in range(3)))
    assert calls == [100, 200]
    with C.use_constants({"call": 1.0}):                 # new constants: a new choice, never a stale one
        op(*(torch.randn(1, 2, 100, 8) for _ in range(3)))
    assert calls == [100, 200, 100]


def test_calibration_cache_roundtrip(tmp_path, monkeypatch):
    """Probes run once and their constants are written per device key; a new process reads them back."""
    monkeypatch.setenv("PATTERNDSL_CACHE", str(tmp_path))
    monkeypatch.setenv("PATTERNDSL_CALIBRATE", "1")
    runs = []
    fake = C.Probe("fake", "cpu", ("flash.64",), lambda d: runs.append(d) or {"flash.64": 4.5e-9})
    monkeypatch.setattr(C, "probes", lambda device_type: [fake])
    monkeypatch.setattr(C, "_MEMORY", {})
    got = C.constants("cpu")
    assert got["flash.64"] == 4.5e-9 and len(runs) == 1 and "calibrated" in got.source
    path = C.cache_path(torch.device("cpu"))
    assert path.parent == tmp_path and f"threads{torch.get_num_threads()}" in path.name
    assert json.loads(path.read_text())["constants"] == {"flash.64": 4.5e-9}
    monkeypatch.setattr(C, "_MEMORY", {})
    assert C.constants("cpu")["flash.64"] == 4.5e-9 and len(runs) == 1       # read back, not measured again


def test_calibrate_off_uses_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("PATTERNDSL_CACHE", str(tmp_path))
    monkeypatch.setenv("PATTERNDSL_CALIBRATE", "0")
    monkeypatch.setattr(C, "_MEMORY", {})
    assert C.constants("cpu").source == "defaults" and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- explain
def test_explain_lists_every_candidate_with_heads_and_mask():
    text = str(pd.compile("longformer_performer", num_heads=4, local_heads=2, window=64).explain(2048))
    assert "stage _0: softmax over sliding(32) | cols({0}) | rows({0}), heads 0:2" in text
    assert "stage _1: linear over full, heads 2:4" in text
    for lw in declared("softmax", "torch"):
        assert lw.name in text
    assert text.count("    ->") == 2 and "does not apply: the mask is not exactly causal" in text
    assert "predicted" in text and "constants: defaults" in text


def test_explain_luna_causal_uses_the_real_length_and_empty_mask_works():
    short = pd.compile("luna_causal", length=4).explain(1024)
    long = pd.compile("luna_causal", length=64).explain(1024)
    assert short.stages[0].predicted < long.stages[0].predicted
    assert str(short.stages[0].flops) == "2048*N" and str(long.stages[0].flops) == "32768*N"   # 8 N l d
    empty = pd.compile("pattern e() { attend softmax over sliding(1) - sliding(1) }")
    assert empty.explain(512).stages[0].complexity == "O(1)"


def test_flex_compile_is_counted_once_and_said():
    p = _problem(M.sliding(256), n=4096)
    flex = next(c for c in candidates(p) if c.lowering.name == "torch.flex")
    if flex.why_not is not None:
        pytest.skip(flex.why_not)
    assert flex.prediction.once > 1.0 and flex.work.once == (("flex.compile", 1.0),)


# -------------------------------------------------------------------------------------------------- CLI
def test_calibrate_cli(monkeypatch, tmp_path, capsys):
    import argparse
    from patterndsl.cli import calibrate as cli
    monkeypatch.setenv("PATTERNDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(C, "_MEMORY", {})
    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers())
    args = ap.parse_args(["calibrate", "--show"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("defaults\ncache: ") and "flash.64" in out
    monkeypatch.setattr(C, "probes", lambda device_type: [])        # nothing to measure: an error, not a guess
    args = ap.parse_args(["calibrate"])
    assert args.run(args) == 1
    assert "no calibration probes for cpu: the planner uses its defaults" in capsys.readouterr().err


def test_pieces_attention_rejects_other_masks():
    from patterndsl.backends.torch.pieces import pieces_attention
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=r"not a union of bands and global rows/columns: blocks\(4\)"):
        pieces_attention(q, q, q, M.blocks(4))


def test_luna_chunked_needs_equal_lengths():
    from patterndsl.backends.torch.luna_chunked import luna_chunked_attention
    q, k = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 9, 4)
    with pytest.raises(PatternError, match="causal Luna needs as many queries as keys: q has 8, k has 9"):
        luna_chunked_attention(q, k, k, torch.randn(1, 1, 2, 4), k)


def test_doctests():
    import doctest
    import importlib
    for name in ("plan.lowering", "plan.model", "plan.calibrate", "plan.decompose", "plan.select",
                 "backends.torch.flash", "backends.torch.band", "backends.torch.pieces", "backends.torch.dense",
                 "backends.torch.work", "backends.torch.causal_linear", "backends.torch.luna_chunked"):
        res = doctest.testmod(importlib.import_module(f"patterndsl.{name}"))
        assert res.failed == 0, name
