"""Backend choice: follows the data, `use_backend` is per thread, bad names and kinds are rejected."""
import threading

import numpy as np
import pytest
import torch

from recscore.kernels import use_backend
from recscore.kernels._backend import array_kind, choose_backend, like


def test_backend_follows_the_data():
    assert array_kind(np.zeros(1)) == "numpy" and array_kind(torch.zeros(1)) == "torch"
    assert choose_backend("numpy") == "cpu" and choose_backend("torch") == "cpu"
    with pytest.raises(TypeError, match="list"):
        array_kind([1.0])


def test_use_backend_nests_and_restores():
    with use_backend("reference"):
        assert choose_backend("numpy") == "reference"
        with use_backend("cpu"):
            assert choose_backend("numpy") == "cpu"
        assert choose_backend("numpy") == "reference"
    assert choose_backend("numpy") == "cpu"


def test_use_backend_is_per_thread():
    inside, seen_elsewhere = threading.Event(), []
    release = threading.Event()

    def forcing():
        with use_backend("reference"):
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=forcing)
    worker.start()
    inside.wait(10)
    seen_elsewhere.append(choose_backend("numpy"))
    release.set()
    worker.join()
    assert seen_elsewhere == ["cpu"]


def test_triton_on_host_data_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(ValueError, match="CUDA tensors"):
        choose_backend("numpy")


def test_results_come_back_as_the_callers_kind():
    result = np.arange(3, dtype=np.float32)
    assert like(result, "numpy") is result
    as_tensor = like(result, "torch")
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.data_ptr() == result.ctypes.data
