"""Microbenchmarks: 2 threads for everyone; GPU cases skip with a reason when there is no CUDA device."""
import pytest

from bench.protocol import set_threads

set_threads()

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:
    HAS_CUDA = False

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU cases run on GPU runners)")
