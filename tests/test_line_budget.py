"""The line budget is a check, not a wish: no module of the package grows past 400 lines (split it by idea)."""
from pathlib import Path

import pytest

LIMIT = 400
PACKAGE = Path(__file__).resolve().parent.parent / "patterndsl"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found():
    assert len(MODULES) > 20 and (PACKAGE / "op" / "attention.py") in MODULES


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_module_within_line_budget(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= LIMIT, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (budget {LIMIT}): split it by idea"
