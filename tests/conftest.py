"""Test set-up: without a CUDA device, Triton kernels run under the interpreter on CPU tensors."""
import os
import zlib

import numpy as np
import pytest

from recscore.kernels._cpu import DETECTED, LEVELS, supported_levels, use_cpu_level

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the CPU path needs no torch
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device():
    """Where Triton-backend tests put their tensors: the GPU if there is one, else the interpreter's CPU."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=LEVELS)
def cpu_level(request):
    """Runs the test once per CPU vector level, the CPU kernels called in it at that level; levels
    this CPU lacks are skipped with the reason."""
    if request.param not in supported_levels():
        pytest.skip(f"this CPU runs at most {LEVELS[DETECTED]}, not {request.param}")
    with use_cpu_level(request.param):
        yield request.param
