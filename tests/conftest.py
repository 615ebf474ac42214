"""Test configuration shared by every test module.

On a machine without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before anything imports triton, so it is set here, at collection, never by the package.
Tests marked `cuda` are skipped without a GPU; `perf/gpu_check.sh` runs them with `pytest -m cuda`.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run perf/gpu_check.sh on the device)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws its own random inputs, reproducibly per test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
