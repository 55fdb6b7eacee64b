"""Test configuration: Triton kernels run in the interpreter when no CUDA GPU is present."""
import os

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never time anything: the planner uses its default cost constants (tests that check choices inject
# their own), and subprocesses inherit this.
os.environ.setdefault("PATTERNDSL_CALIBRATE", "0")
if "PATTERNDSL_CACHE" not in os.environ:          # and no calibration cached on this machine is read
    import tempfile
    os.environ["PATTERNDSL_CACHE"] = os.path.join(tempfile.gettempdir(), "patterndsl-tests-no-calibration")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:   # not `in item.keywords`: that holds folder names
            item.add_marker(skip)
