"""Every example in a module docstring of the package runs and prints what it shows (one case per module)."""
import doctest
import importlib
import pkgutil

import pytest

import patterndsl


def _modules():
    for info in pkgutil.walk_packages(patterndsl.__path__, "patterndsl."):
        if info.name.endswith("__main__"):
            continue  # runs the CLI when imported
        if ".triton" in info.name and importlib.util.find_spec("triton") is None:
            continue
        yield info.name


@pytest.mark.parametrize("name", list(_modules()))
def test_module_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, (f"{result.failed} of {result.attempted} examples in {name} failed "
                                f"(pytest --doctest-modules shows which)")
