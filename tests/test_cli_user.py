"""The user subcommands (explain, show, bench, emit, demo): each runs as a subprocess (`python -m
patterndsl.cli ...`); error messages are checked in-process, where it is fast."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl.cli import bench, demo, emit, explain, options, show
from patterndsl.cli.picture import ascii_picture, dense_tile_classes, panels, short_mask
from patterndsl.ir import mask as M

ROOT = Path(__file__).resolve().parents[1]
MODULES = (explain, show, bench, emit, demo)

LOCAL = "pattern local(w: int = 2, g: set = {0}) {\n    attend softmax over sliding(w) | global(g)\n}\n"
BROKEN = "pattern broken() {\n    attend softmax over slidng(4)\n}\n"


def _have_cli() -> bool:
    try:
        from patterndsl.cli import main  # noqa: F401
        from patterndsl.grammar import parse_module  # noqa: F401
        from patterndsl.library import builtin_names  # noqa: F401
    except ImportError:
        return False
    return (ROOT / "patterndsl" / "cli" / "__main__.py").exists()


def _have_parser() -> bool:
    try:
        from patterndsl.grammar import parse_module  # noqa: F401
        from patterndsl.library import builtin_names  # noqa: F401
    except ImportError:
        return False
    return True


needs_cli = pytest.mark.skipif(not _have_cli(), reason="the CLI entry point and parser have not landed")
needs_parser = pytest.mark.skipif(not _have_parser(), reason="the parser has not landed")


def cli(*argv, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m patterndsl.cli ARGV` from the repository root."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "patterndsl.cli", *map(str, argv)], capture_output=True,
                          text=True, env=full, cwd=cwd or ROOT, timeout=300)


def run_inprocess(*argv):
    """Parse ARGV with a parser holding only the user subcommands and run it; returns the exit status."""
    ap = argparse.ArgumentParser(prog="patterndsl")
    sub = ap.add_subparsers()
    for mod in MODULES:
        mod.add_parser(sub)
    args = ap.parse_args([str(a) for a in argv])
    return args.run(args)


@pytest.fixture
def local_attn(tmp_path):
    path = tmp_path / "local.attn"
    path.write_text(LOCAL)
    return path


# ------------------------------------------------------------------------------------------- subprocess
@needs_cli
@pytest.mark.parametrize("sub", ["explain", "show", "bench", "emit", "demo"])
def test_help(sub):
    r = cli(sub, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: patterndsl {sub}" in r.stdout or f"{sub}" in r.stdout.splitlines()[0]
    assert "--help" in r.stdout


@needs_cli
def test_explain_subprocess(local_attn):
    r = cli("explain", local_attn, "-n", 1024, "--set", "w=16", "--head-dim", 32)
    assert r.returncode == 0, r.stderr
    for line in ("plan for local at N = 1024, head_dim = 32", "kernel  torch.", "candidates (predicted time",
                 "pairs   = 35*N", "FLOPs   = 4480*N", "class   O(N); beats dense attention from N ="):
        assert line in r.stdout, line


@needs_cli
def test_show_subprocess_png_and_ascii(local_attn, tmp_path):
    out = tmp_path / "mask.png"
    r = cli("show", local_attn, "-n", 96, "-o", out, "--block", 16)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size < 200_000
    r = cli("show", local_attn, "-n", 12, "--ascii", "--block", 4)
    assert r.returncode == 0, r.stderr
    assert "###" in r.stdout and "density" in r.stdout


@needs_cli
def test_show_without_matplotlib(local_attn, tmp_path):
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), str(ROOT)])}
    r = cli("show", local_attn, "-n", 32, "-o", tmp_path / "m.png", env=env)
    assert r.returncode == 1
    assert "drawing masks needs matplotlib" in r.stderr and "--ascii" in r.stderr
    assert "Traceback" not in r.stderr


@needs_cli
def test_bench_subprocess(local_attn):
    r = cli("bench", local_attn, "--sizes", "64,128", "--repeat", 1, "--heads", 2, "--head-dim", 16)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 64 ") or ln.startswith("| 128 ")]
    assert len(rows) == 2


@needs_cli
def test_emit_subprocess(local_attn):
    r = cli("emit", local_attn, "--set", "w=8")
    assert r.returncode == 0, r.stderr
    assert "@triton.jit" in r.stdout


@needs_cli
def test_demo_subprocess(tmp_path):
    r = cli("demo", "--only", "sliding_window,luna", "-n", 128, "--picture-len", 64, "--repeat", 1,
            "-o", tmp_path / "pics")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2/2 built-ins match the reference" in r.stdout
    assert (tmp_path / "pics" / "sliding_window.png").exists() and (tmp_path / "pics" / "luna.png").exists()


@needs_cli
def test_errors_render_without_traceback(tmp_path):
    bad = tmp_path / "broken.attn"
    bad.write_text(BROKEN)
    r = cli("explain", bad)
    assert r.returncode == 1
    assert "broken.attn:2:" in r.stderr and "^" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- in-process runs
@needs_parser
def test_show_ascii_inprocess(local_attn, capsys):
    assert run_inprocess("show", local_attn, "-n", 8, "--ascii", "--block", 4, "--set", "w=1") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1] == "########"          # row 0 is a global row


@needs_parser
def test_show_builtin_per_stage_panels(tmp_path, capsys):
    assert run_inprocess("show", "luna", "-n", 64, "-o", tmp_path / "luna.png") == 0
    assert "2 panels" in capsys.readouterr().out


@needs_parser
def test_bench_flex_refused_for_linear_attention(capsys):
    assert run_inprocess("bench", "performer", "--flex", "--sizes", "32") == 1
    assert "FlexAttention cannot run performer: not softmax attention" in capsys.readouterr().err


@needs_parser
def test_bench_flex_cpu(local_attn, capsys):
    pytest.importorskip("torch.nn.attention.flex_attention")
    assert run_inprocess("bench", local_attn, "--flex", "--sizes", "64", "--repeat", 1, "--warmup", 0,
                         "--heads", 1, "--head-dim", 16) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 64 ")][0]
    assert row.split("|")[4].strip() != "-"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@needs_parser
def test_cuda_missing(local_attn, capsys):
    assert run_inprocess("bench", local_attn, "--device", "cuda") == 1
    assert "--device cuda, but this machine has no CUDA GPU" in capsys.readouterr().err


@needs_parser
def test_unknown_device(local_attn, capsys):
    assert run_inprocess("bench", local_attn, "--device", "tpu") == 1
    assert "unknown device 'tpu'" in capsys.readouterr().err


@needs_parser
def test_unknown_builtin(capsys):
    assert run_inprocess("explain", "longformr") == 1
    err = capsys.readouterr().err
    assert "'longformr' is not a built-in program or a .attn file" in err and "did you mean 'longformer'" in err


@needs_parser
def test_unknown_parameter(local_attn, capsys):
    assert run_inprocess("show", local_attn, "--ascii", "--set", "width=3") == 1
    assert "unknown parameter 'width' for pattern local" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert run_inprocess("show", tmp_path / "nope.attn", "--ascii") == 1
    assert "cannot read" in capsys.readouterr().err


@needs_parser
def test_emit_unknown_constexpr(local_attn, capsys):
    assert run_inprocess("emit", local_attn, "-D", "BLOCK_Q=64") == 1
    assert "unknown constexpr 'BLOCK_Q'" in capsys.readouterr().err


@needs_parser
def test_emit_to_file(local_attn, tmp_path, capsys):
    out = tmp_path / "k.py"
    assert run_inprocess("emit", local_attn, "-D", "BLOCK_M=32", "-o", out) == 0
    assert "BLOCK_M=32" in out.read_text() and "wrote" in capsys.readouterr().out


@needs_parser
def test_unwritable_outputs_are_errors_not_tracebacks(local_attn, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    assert run_inprocess("emit", local_attn, "-o", missing / "k.py") == 1
    assert f"error: cannot write {missing / 'k.py'}: No such file or directory" in capsys.readouterr().err
    assert run_inprocess("show", local_attn, "-o", tmp_path / "x.txt") == 1
    err = capsys.readouterr().err
    assert "cannot draw to" in err and "x.txt: the image formats are .png, .svg, .pdf" in err


@needs_parser
def test_show_refuses_lengths_it_cannot_draw(local_attn, capsys):
    assert run_inprocess("show", local_attn, "-n", "100000", "--ascii") == 1
    err = capsys.readouterr().err
    assert "show draws from the dense mask: N up to 16384, got 100000" in err and "patterndsl explain" in err


@needs_parser
def test_bench_plot_path_is_checked_before_timing(local_attn, tmp_path, capsys):
    assert run_inprocess("bench", local_attn, "--sizes", "64", "--plot", tmp_path / "b.txt") == 1
    err = capsys.readouterr().err
    assert "cannot draw to" in err and "b.txt: the image formats are .png" in err


def test_bench_warmup_must_not_be_negative(local_attn, capsys):
    with pytest.raises(SystemExit):
        run_inprocess("bench", local_attn, "--warmup", "-3")
    assert "expected an int >= 0, got -3" in capsys.readouterr().err


@needs_parser
def test_demo_unknown_builtin(capsys):
    assert run_inprocess("demo", "--only", "bigbrid") == 1
    assert "'bigbrid' is not a built-in" in capsys.readouterr().err


def test_explain_without_planner(monkeypatch, local_attn, capsys):
    def broken(self, **kw):
        raise ImportError("no module named plan")
    monkeypatch.setattr(options, "compile_op", lambda args, **kw: _local_op())
    monkeypatch.setattr(pd.AttentionOp, "explain", broken)
    assert run_inprocess("explain", local_attn) == 1
    assert "the planner is not available: no module named plan" in capsys.readouterr().err


def test_emit_without_codegen(monkeypatch, local_attn, capsys):
    def broken(self, **kw):
        raise ImportError("no triton")
    monkeypatch.setattr(options, "compile_op", lambda args, **kw: _local_op())
    monkeypatch.setattr(pd.AttentionOp, "emit", broken)
    assert run_inprocess("emit", local_attn) == 1
    assert "the Triton code generator is not available: no triton" in capsys.readouterr().err


def _local_op():
    from patterndsl.ir.program import ProgramIR, Softmax, Stage
    return pd.AttentionOp(None, ProgramIR("local", (Stage("out", Softmax(), M.sliding(2)),), ("out",)))


# -------------------------------------------------------------------------------------------- --set
@pytest.mark.parametrize("text,value", [("256", 256), ("-3", -3), ("0.5", 0.5), ("1e-4", 1e-4), ("true", True),
                                        ("false", False), ('"abc"', "abc"), ("abc", "abc"), ("{}", frozenset()),
                                        ("{0, 5,9}", frozenset({0, 5, 9}))])
def test_parse_literal(text, value):
    got = options.parse_literal(text)
    assert got == value and type(got) is type(value)


def test_parse_literal_errors():
    with pytest.raises(pd.PatternError, match=r"cannot read g=\{a, 1\}: a set holds token indices >= 0"):
        options.parse_literal("{a, 1}", "g")
    with pytest.raises(pd.PatternError, match=r"cannot read causal=True as an .attn literal") as e:
        options.parse_literal("True", "causal")
    assert "booleans are spelt true/false" in str(e.value)
    with pytest.raises(pd.PatternError, match=r"cannot read w=3\+4 as an .attn literal") as e:
        options.parse_literal("3+4", "w")
    assert "values are an int, a float" in str(e.value)


def test_parse_sets_needs_name_value():
    assert options.parse_sets(["w = 3", "g={1}"]) == {"w": 3, "g": frozenset({1})}
    with pytest.raises(pd.PatternError, match="--set expects NAME=VALUE, got 'window'"):
        options.parse_sets(["window"])
    with pytest.raises(pd.PatternError, match="--set expects NAME=VALUE, got '=3'"):
        options.parse_sets(["=3"])


def test_argparse_types():
    assert options.sizes("64, 128") == [64, 128]
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive int, got 0"):
        options.positive("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive int, got 'x'"):
        options.positive("x")
    with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=INT, got 'BLOCK_M=x'"):
        emit._constexpr("BLOCK_M=x")


# ------------------------------------------------------------------------------------------- pictures
def test_dense_tile_classes_edges():
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[:4, :4] = True
    m[4, 4] = True
    assert dense_tile_classes(m, 4).tolist() == [[2, 0], [0, 2]]
    m[4, 4] = False
    m[4, 0] = True
    assert dense_tile_classes(m, 4).tolist() == [[2, 0], [1, 0]]


def test_panel_errors():
    with pytest.raises(pd.PatternError, match="the sequence length must be an int >= 1, got 0"):
        panels(_local_op(), 0)
    with pytest.raises(pd.PatternError, match="the tile size must be >= 1, got 0"):
        panels(_local_op(), 8, block=0)


def test_ascii_cells_pool_long_sequences():
    text = ascii_picture(panels(_local_op(), 200), width=50)
    lines = text.splitlines()
    assert "(1 char = 4x4 pairs)" in lines[0] and len(lines) == 51 and len(lines[1]) == 50


@pytest.mark.parametrize("mask,text", [
    (M.sliding(8) | M.global_({0}), "sliding(8) | global({0})"),
    (M.window(4, 0) | M.cols(set(range(4))), "window(4, 0) | cols(range(0, 4))"),
    (M.Same("doc") & M.CAUSAL, "causal & same(doc)"),
    (M.sliding(2, 3), "sliding(2, 3)"),
    (M.strided(4) & ~M.sliding(1), "strided(4) & ~sliding(1)"),
    (M.rows({1, 5, 9, 12, 20}), "rows({1, 5, 9, 12, ...})"),
])
def test_short_mask(mask, text):
    assert short_mask(mask) == text


@pytest.mark.parametrize("module", ["options", "picture", "workload"])
def test_doctests(module):
    import doctest
    import importlib
    res = doctest.testmod(importlib.import_module(f"patterndsl.cli.{module}"))
    assert res.failed == 0 and res.attempted > 0
