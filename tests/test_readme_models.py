"""The README's "In a transformers model" snippet and docs/decoding.md's example run as written."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path, heading: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if heading is not None:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[start:nxt if nxt >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_transformers_snippet_runs():
    pytest.importorskip("transformers")
    (code,) = _python_blocks(ROOT / "README.md", "## In a transformers model")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)                      # noqa: S102 (our own README)
    model, tokens = scope["model"], scope["tokens"]
    assert tokens.shape == (2, 50)
    ops = [m.patterndsl_op.name for m in __import__("patterndsl").integrations.hf.attention_modules(model).values()]
    assert ops == ["sliding_window", "causal", "sliding_window", "causal"]


def test_decoding_doc_example_runs():
    (code,) = _python_blocks(ROOT / "docs" / "decoding.md")
    scope: dict = {}
    exec(compile(code, "docs/decoding.md", "exec"), scope)              # noqa: S102
    cache = scope["cache"]
    assert cache.length == 400 and max(cache.held().values()) <= 2 * (512 + 4 + 64)


@pytest.mark.parametrize("module", ["patterndsl.op", "patterndsl.op.attention", "patterndsl.op.validate",
                                    "patterndsl.decode", "patterndsl.integrations.hf", "patterndsl.ir.masks.base"])
def test_doctests(module):
    import doctest
    import importlib
    if module == "patterndsl.integrations.hf":
        pytest.importorskip("transformers")
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0
