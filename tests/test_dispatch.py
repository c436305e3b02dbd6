"""Backend choice: follows the data, `use_backend` is per thread, bad names and kinds are rejected."""
import threading

import numpy as np
import pytest
import torch
from threads import run_workers

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
    inside, release, seen_elsewhere = threading.Event(), threading.Event(), []

    def forcing():
        with use_backend("reference"):
            inside.set()
            assert release.wait(10)

    def looking():
        assert inside.wait(10)
        seen_elsewhere.append(choose_backend("numpy"))
        release.set()

    run_workers([forcing, looking], timeout=20)
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


def test_device_side_index_check_agrees_with_the_c_one(rng):
    """The tensor-reduction check used for CUDA inputs finds the same first bad position as the C scan."""
    from recscore.bindings import _checks
    from recscore.kernels._validate import first_bad_index_on_device
    rows = np.array([5, 1, 9], np.int64)
    for _ in range(50):
        B = int(rng.integers(1, 4))
        lengths = rng.integers(0, 4, 3 * B)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = rng.integers(-2, 10, offsets[-1]).astype(np.int64)
        want = _checks.first_bad_index(indices, offsets, rows, B)
        assert first_bad_index_on_device(torch.from_numpy(indices), offsets, rows, B) == want


@pytest.mark.parametrize("call", ["embedding_bag", "topk", "qmatmul"])
def test_byte_swapped_arrays_are_rejected(call):
    """Kernels read native-order bytes: a big-endian array must raise, not give garbage."""
    from recscore.kernels import embedding_bag, qmatmul, quantize_matrix, topk
    swapped = np.ones((4, 32), ">f4")
    with pytest.raises(TypeError, match="native byte order"):
        if call == "embedding_bag":
            embedding_bag(swapped, np.zeros(2, np.int64), np.array([0, 2], np.int64))
        elif call == "topk":
            topk(swapped[:1], np.ones((4, 32), np.float32), 2)
        else:
            qmatmul(swapped, quantize_matrix(np.ones((8, 32), np.float32), "int8", group_size=32))
