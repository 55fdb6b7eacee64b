"""The analysis verbs on the command line: `diff`, `reach`, `check --prove` (in-process, one subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patterndsl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_diff_proves_the_examples(capsys):
    code, out, _ = run(capsys, "diff", "causal", "where(j <= i)")
    assert code == 0 and out.splitlines()[2] == "equal, proved for every N"
    code, out, _ = run(capsys, "diff", "window(3, 0)", "causal")
    assert "A within B, proved for every N" in out and "in B, not in A: i=4, j=0 (N = 5)" in out
    code, out, _ = run(capsys, "diff", "longformer", "longformer", "--set-b", "window=256")
    assert "B within A, proved for every N" in out and "in A, not in B: i=1, j=130 (N = 131)" in out
    code, out, _ = run(capsys, "diff", "longformer", "longformer", "--set", "window=8", "--set-a", "globals={0, 3}")
    assert "A within B" not in out and "B within A, proved for every N" in out


def test_diff_outside_the_fragment_states_its_bound(capsys):
    code, out, _ = run(capsys, "diff", "where(i * j < 40)", "where(i * j < 60)", "-n", "128")
    assert code == 0 and "A within B, checked for N <= 128" in out and "in B, not in A: i=6, j=7 (N = 8)" in out
    assert "(no proof for every N: where(i * j < 40): `i * j` multiplies two expressions in i or j)" in out


@pytest.mark.parametrize("argv,message", [
    (["diff", "nosuch.attn", "causal"], "no such file: nosuch.attn"),
    (["diff", "luna", "longformer"], "cannot compare luna and longformer: 2 stage(s) against 1"),
    (["diff", "causal", "causal", "-n", "100000"], "the bound N of bounded checks must be an int in 1..65536"),
    (["diff", "causal", "causal", "--set-a", "window"], "--set expects NAME=VALUE, got 'window'"),
    (["reach", "sliding(2)", "-n", "8", "--query", "9"], "the query must be a token index in 0..7, got 9"),
    (["reach", "sliding(2)", "causal", "--layers", "3"], "2 patterns for 3 layers"),
    (["reach", "sliding(2)", "-n", str(1 << 25)], "the sequence length N must be an int in 1..16777216"),
    (["reach", "sliding(2)", "-o", "x.txt"], "cannot draw to x.txt: the image formats are"),
    (["check", "--prove", "-n", "0", "longformer"], "the bound N of bounded checks must be an int in 1..65536"),
])
def test_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and message in err, err


def test_reach_prints_fields_and_depth(capsys, tmp_path):
    code, out, _ = run(capsys, "reach", "sliding(256)", "--layers", "3", "-n", "1048576")
    assert code == 0
    assert "reach of query 1048575 (N = 1048576), 3 layers, residual stream included" in out
    assert "[1047807, 1048575]" in out                          # 3 layers of 256 back
    assert "query 1048575 reads token 0 after 4096 layers (closed form for sliding(256))" in out
    code, out, _ = run(capsys, "reach", "sliding(4, 4)", "sliding(4, 2)", "sliding(4)", "-n", "64", "--width", "64")
    assert code == 0 and out.count("\n") > 6 and "does not read token 0 within these 3 layers" in out
    pytest.importorskip("matplotlib")
    path = tmp_path / "reach.png"
    code, out, _ = run(capsys, "reach", "longformer", "--set", "window=64", "-n", "2048", "-o", path)
    assert code == 0 and path.stat().st_size > 1000 and f"wrote {path}" in out


def test_check_prove(capsys):
    code, out, _ = run(capsys, "check", "--prove", ROOT / "examples" / "sink_window.attn", "luna")
    assert code == 0
    assert "sink_window: causal (no output reads a later token), proved for every N" in out
    assert "allowed pairs: 261*N - 33930 for N >= 260" in out
    assert "luna: not causal: stage out reads packed" in out
    code, out, _ = run(capsys, "check", "longformer")
    assert "future keys" not in out


def test_the_entry_point_lists_the_verbs():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "patterndsl.cli", "diff", "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "patterndsl diff causal \"where(j <= i)\"" in res.stdout


def _console_blocks(text):
    """(command, expected output) for every `$ patterndsl ...` line in a ```console block."""
    out, block = [], None
    for line in text.splitlines():
        if line.startswith("```console"):
            block = []
        elif line.startswith("```") and block is not None:
            cmd, expected = block[0], block[1:]
            out.append((cmd[len("$ patterndsl "):], "\n".join(expected)))
            block = None
        elif block is not None:
            block.append(line)
    return out


def test_the_outputs_in_the_docs_are_real(capsys, monkeypatch):
    import shlex
    monkeypatch.chdir(ROOT)
    blocks = _console_blocks((ROOT / "docs" / "analysis.md").read_text())
    assert len(blocks) >= 12
    for cmd, expected in blocks:
        code, out, err = run(capsys, *shlex.split(cmd))
        assert (out + err).rstrip("\n") == expected, cmd


def test_the_python_examples_in_the_docs():
    import patterndsl as pd
    res = pd.compare("window(3, 0)", "causal")
    assert (res.verdict, res.proved) == ("A within B", True)
    assert pd.compare(pd.compile("longformer", window=64), "sliding(32) | global({0})").verdict == "equal"
    r = pd.reach("sliding_window", layers=12, n=1 << 20)
    assert (r.span(12), r.count(12), r.depth) == ((999435, 1048575), 49141, 257)
