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

# pytest-xdist (`-n 2 --dist loadfile`, the README's command): the workers share the cores, so each runs torch
# with its share of the intra-op threads (two workers with two threads each would fight over two cores).
# `loadfile` keeps a file on one worker, so a module-scoped fixture (the gloo processes, the AOT compiles) is
# set up once.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:   # not `in item.keywords`: that holds folder names
            item.add_marker(skip)
