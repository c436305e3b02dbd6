"""Test set-up: without a CUDA device, Triton kernels run under the interpreter on CPU tensors."""
import os
import zlib

import numpy as np
import pytest

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
