"""Every example `.attn` file compiles and matches the reference (fp64 outputs and gradients) on small random
inputs, exports to FlexAttention with the same mask, and the training script runs."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl.cli.workload import make_inputs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
SMALL = {  # parameters that make each example non-trivial at N = 40
    "longformer_performer_heads": {"window": 8, "features": 16, "globals": {0, 17}},
    "bigbird_causal": {"window": 3, "block": 8, "count": 2, "globals": {0}},
    "window_favor_causal": {"window": 5, "features": 16},
    "sink_window": {"window": 6, "sinks": 3},
    "document_mask": {"window": 9},
    "alibi": {"heads": 4},
    "t5_bias": {"heads": 4, "buckets": 8, "max_distance": 20},
    "gemma2": {"window": 7, "cap": 1.5},
}


def _have_parser() -> bool:
    try:
        from patterndsl.grammar import parse_module  # noqa: F401
    except ImportError:
        return False
    return True


needs_parser = pytest.mark.skipif(not _have_parser(), reason="the parser has not landed")


def test_every_example_has_small_parameters():
    assert sorted(p.stem for p in EXAMPLES) == sorted(SMALL)


@needs_parser
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.stem}-B2-N40-D8")
def test_example_matches_reference(path):
    prog = pd.load(path)
    params = SMALL[prog.name]
    op = pd.compile(prog, **params)
    ref = pd.compile(prog, backend="reference", **params)
    q, k, v, extra = make_inputs(op, 2, 4, 40, 8, torch.float64, seed=3, requires_grad=True)
    out, want = op(q, k, v, **extra), ref(q, k, v, **extra)
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-9)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    wants = torch.autograd.grad(want, (q, k, v), g)
    for name, a, b in zip(("dq", "dk", "dv"), grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m: f"{path.stem} {name}: {m}")


@needs_parser
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_exports_to_flex(path):
    from torch.nn.attention.flex_attention import create_mask
    from patterndsl.cli.workload import runtime_example
    from patterndsl.export import to_flex
    prog = pd.load(path)
    op = pd.compile(prog, backend="reference", **SMALL[prog.name])
    runtime = runtime_example(op, 2, 40)
    got = create_mask(to_flex(op, n_q=40, runtime=runtime), 2 if runtime else None, op.ir.num_heads, 40, 40)
    want = op.mask(40, runtime=runtime)
    want = want[None, None] if want.dim() == 2 else (want[None] if op.ir.by_heads else want[:, None])
    assert torch.equal(got, want.expand_as(got))


# ------------------------------------------------------------------------------------------- training
def _train_module():
    spec = importlib.util.spec_from_file_location("train_long_range", ROOT / "examples" / "train_long_range.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _nn_ready() -> bool:
    return hasattr(pd.nn, "Attention")


@pytest.mark.skipif(not _nn_ready(), reason="pd.nn.Attention has not landed")
def test_training_script_runs_two_steps():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_long_range.py"), "--steps", "2",
                        "--seq-len", "32", "--batch", "4", "--test-size", "8", "--dim", "16"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "ms per training step" in r.stdout


@pytest.mark.skipif(not _nn_ready(), reason="pd.nn.Attention has not landed")
@pytest.mark.parametrize("name", ["window_favor_causal", "document_mask"])
def test_training_script_with_examples(name, capsys):
    mod = _train_module()
    args = [str(ROOT / "examples" / f"{name}.attn"), "--steps", "2", "--seq-len", "32", "--batch", "4",
            "--test-size", "8", "--dim", "16"]
    if name == "window_favor_causal":
        args += ["--heads", "8", "--set", "window=4", "--set", "features=8"]
    assert mod.main(args) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_far_majority_labels():
    mod = _train_module()
    tokens, labels = mod.far_majority_batch(64, 40, torch.Generator().manual_seed(0))
    markers = tokens > mod.NOISE
    assert (markers.sum(1) == mod.MARKS).all() and (tokens[:, 0] == 0).all()
    assert not markers[:, :20].any()
    b_count = (tokens == mod.NOISE + 2).sum(1)
    assert torch.equal((b_count > mod.MARKS // 2).long(), labels)
    assert 0.25 < labels.float().mean() < 0.75


@needs_parser
def test_training_script_errors(capsys):
    mod = _train_module()
    assert mod.main(["longformr", "--steps", "1"]) == 1
    assert "'longformr' is not a built-in program" in capsys.readouterr().err
    assert mod.main(["--seq-len", "4"]) == 1
    assert "need --seq-len >= 10, --steps >= 1 and --batch >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert mod.main(["--device", "cuda", "--steps", "1"]) == 1
        assert "--device cuda, but this machine has no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not _nn_ready(), reason="pd.nn.Attention has not landed")
def test_causal_patterns_read_the_answer_from_the_last_token():
    """Under a causal mask token 0 sees only itself: the model reverses the sequence and reads the last token,
    which sees the markers; a bidirectional pattern reads token 0 as it is."""
    mod = _train_module()
    causal = mod.Classifier(pd.parse("pattern c() { attend softmax over causal }"), 24, 16, 2, 1, {})
    plain = mod.Classifier(pd.builtin("longformer"), 24, 16, 2, 1, {"window": 4})
    assert causal.reversed and not plain.reversed
    tokens = torch.randint(1, 10, (2, 24))
    far = tokens.clone()
    far[:, 23] = 12                                      # change the token farthest from CLS (token 0)
    for model in (causal, plain):
        assert not torch.allclose(model(far), model(tokens)), "the answer must see the far end"
    causal.reversed = False                              # read token 0 under the causal mask: blind
    assert torch.allclose(causal(far), causal(tokens))


def test_near_far_experiment_runs_small():
    """The accuracy experiment of examples/near_far_error.py at a small size: finite errors for every method."""
    spec = importlib.util.spec_from_file_location("near_far_error", ROOT / "examples" / "near_far_error.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--small"])
    for causal, err in out.items():
        assert set(err) == {"near+far", "FAVOR+", "window", "FAVOR+ same m"}
        assert all(0 < e < 10 for e in err.values()), (causal, err)
