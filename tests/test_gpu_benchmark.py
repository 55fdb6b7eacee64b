"""benchmarks/gpu.py runs end to end (the dry run: tiny sizes, every method called once, outputs cross-checked,
the BENCHMARKS.md section written), so the script the lead runs on a GPU is known to work."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the dry run needs TRITON_INTERPRET=1")
def test_benchmark_dry_run(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nkept\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--dry-run", "--cases",
                          "longformer-4k,performer-256-causal,luna-16", "--json", str(out), "--write", str(md)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["case"], r["pass_"]) for r in rows} == {(c, p) for c in ("longformer-4k", "performer-256-causal-4k",
                                                                       "luna-16-16k") for p in ("fwd", "fwd+bwd")}
    assert all(r["check"] == "ok" for r in rows)
    assert {"patterndsl", "flex", "SDPA (dense)"} <= set(rows[0]["times"])
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept") and "| longformer-4k | B1 H1 N128 D16 | fwd | flex |" in text
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu as bench
    finally:
        sys.path.pop(0)
    md.write_text(text + "\nafter\n")
    bench.write_markdown(md, bench.markdown(rows[:1], "test device"))      # the section is replaced in place
    again = md.read_text()
    assert again.count("benchmarks/gpu.py: begin") == 1 and again.endswith("after\n") and "test device" in again
    assert "| performer-256-causal-4k |" not in again
