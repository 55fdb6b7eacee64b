"""Install and entry-point behaviour: triton is optional, the demo writes outside the work tree, CLI
literals follow the language's limits, and the public entry adds context to errors once."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import patterndsl as pd
from patterndsl.cli.options import cache_dir, parse_literal
from patterndsl.grammar import check_module, parse_module

ROOT = Path(__file__).parents[1]
NO_TRITON = "import sys; sys.modules['triton'] = None\n"   # `import triton` now raises ImportError


def run_python(code: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------------------------------- triton
def test_triton_is_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["triton"])
    assert any(d.startswith("triton") for d in extras["test"])      # CI runs the interpreter tests


def test_the_triton_backend_without_triton_is_a_pattern_error():
    r = run_python(NO_TRITON + "import patterndsl as pd\n"
                   "try:\n    pd.compile('longformer', backend='triton')\n"
                   "except pd.PatternError as e:\n    print(e)\n"
                   "op = pd.compile('longformer', window=4)\n"       # every other backend still works
                   "print(sorted(set(op.backends('cpu').values())))")
    assert r.returncode == 0, r.stderr
    assert "error: the Triton backend needs the triton package, which is not installed" in r.stdout
    assert "hint: pip install 'patterndsl[triton]' (CUDA builds of torch include it)" in r.stdout
    assert "['torch']" in r.stdout


def test_emit_without_triton_prints_the_source_and_says_it_needs_triton():
    r = run_python(NO_TRITON + "from patterndsl.cli import main\nraise SystemExit(main(['emit', 'sliding_window']))")
    assert r.returncode == 0, r.stderr
    assert "def mask_tile" in r.stdout
    assert "note: the generated source runs only with triton installed (pip install 'patterndsl[triton]')" in r.stderr


# --------------------------------------------------------------------------------------------------- demo
def test_demo_writes_to_the_cache_not_the_current_directory(tmp_path):
    cwd, cache = tmp_path / "work", tmp_path / "cache"
    cwd.mkdir()
    r = run_python("from patterndsl.cli import main\nraise SystemExit(main(['demo', '--only', 'sliding_window', "
                   "'-n', '64', '--picture-len', '32', '--repeat', '1']))", cwd=cwd,
                   env={"XDG_CACHE_HOME": str(cache)})
    assert r.returncode == 0, r.stdout + r.stderr
    where = cache / "patterndsl" / "demo"
    assert f"pictures in {where}/" in r.stdout
    assert [p.name for p in where.iterdir()] and list(cwd.iterdir()) == []
    assert "patterndsl-demo/" in (ROOT / ".gitignore").read_text().splitlines()


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir("demo") == os.path.join(str(tmp_path), "patterndsl", "demo")


# --------------------------------------------------------------------------------------------- CLI values
@pytest.mark.parametrize("text,message", [
    ("9" * 5000, "cannot read value=" + "9" * 37 + "...: integers stay below 2^40"),
    ("\u0663", "cannot read value=\u0663 as an .attn literal"),
    ("{1, 99999999999999}", "a set holds token indices >= 0"),
])
def test_cli_literals_are_ascii_and_bounded(text, message):
    with pytest.raises(pd.PatternError) as info:
        parse_literal(text)
    assert message in info.value.message
    assert parse_literal("1099511627775") == (1 << 40) - 1


# ------------------------------------------------------------------------------------- context added once
def test_inner_layers_raise_spanned_errors_and_the_entry_adds_the_source():
    for text in ["pattern p() { attend softmax over $ }", "pattern p() { attend softmax over slidng(2) }"]:
        with pytest.raises(pd.PatternError) as inner:
            check_module(parse_module(text, "x.attn"))
        assert inner.value.source is None and inner.value.line == 1
        with pytest.raises(pd.PatternError) as outer:
            pd.parse(text, "x.attn")
        assert outer.value.source.name == "x.attn" and outer.value.message == inner.value.message
        assert str(outer.value).startswith("x.attn:1:") and str(outer.value).count("x.attn") == 1


def test_compile_time_parameters_are_named_once_and_not_when_the_error_names_them():
    with pytest.raises(pd.PatternError) as info:
        pd.compile("pattern p(w: int = 10) { attend softmax over sliding(w - 5) }", w=2)
    assert info.value.hint == "with the parameters given at compile time: w=2"
    with pytest.raises(pd.PatternError) as info:
        pd.compile("pattern p(w: int = 1) { attend softmax }", w="2")
    assert info.value.hint is None and "parameter 'w' expects int" in info.value.message
