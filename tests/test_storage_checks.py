"""RowTable and QuantizedMatrix check their storage when they are made and cannot be changed after:
the CPU kernels take the sizes from `shape` and read the arrays at raw addresses, so a shape the
storage does not hold would read past it."""
import copy
import pickle

import numpy as np
import pytest
import torch

from recscore.kernels import (QuantizedMatrix, RowTable, embedding_bag, qmatmul, quantize_matrix, quantize_rows,
                              topk)
from recscore.kernels.qmatmul import reference as matrix_reference

ROW_DTYPES = ["fp32", "fp16", "bf16", "int8", "int4"]


def unaligned(array):
    """A copy of `array` one byte past an aligned address (what np.frombuffer at an odd offset gives)."""
    raw = np.zeros(array.nbytes + 1, np.uint8)
    out = np.frombuffer(raw.data, array.dtype, array.size, offset=1).reshape(array.shape)
    out[...] = array
    return out


F32 = np.zeros((4, 6), np.float32)
CODES = np.zeros((4, 6), np.uint8)
QPARAM = np.zeros(4, np.float32)


@pytest.mark.parametrize("args, error, message", [
    (("fp32", (1000, 6), F32), ValueError, r"data has shape \(4, 6\), but a table of shape \(1000, 6\) stored as fp32"),
    (("fp32", (4, 7), F32), ValueError, r"needs data of shape \(4, 7\)"),
    (("int4", (4, 6), CODES, QPARAM, QPARAM), ValueError, r"stored as int4 needs data of shape \(4, 3\)"),
    (("fp64", (4, 6), F32), ValueError, "dtype must be one of"),
    (("fp32", (4,), F32), TypeError, "shape must be a pair of integers"),
    (("fp32", (4.0, 6), F32), TypeError, "shape must be a pair of integers"),
    (("fp32", (-4, 6), F32), ValueError, "shape must not be negative"),
    (("fp32", (4, 6), F32.tolist()), TypeError, "data must be a NumPy array or a torch.Tensor, got list"),
    (("fp32", (4, 6), F32.astype(np.float64)), TypeError, "data of a fp32 table must be float32, got float64"),
    (("fp16", (4, 6), F32), TypeError, "data of a fp16 table must be float16"),
    (("bf16", (4, 6), torch.zeros((4, 6), dtype=torch.int16)), TypeError, "must be bfloat16"),
    (("fp32", (24, 1), F32.reshape(-1)), ValueError, "data must be 2-D"),
    (("fp32", (4, 6), np.asfortranarray(F32)), ValueError, "each row's elements side by side"),
    (("fp32", (4, 6), F32.astype(">f4")), TypeError, "native byte order"),
    (("fp32", (4, 6), unaligned(F32)), ValueError, "data is not aligned to its 4-byte elements"),
    (("fp32", (4, 6), F32, QPARAM, QPARAM), ValueError, "a fp32 table has no scale or bias"),
    (("int8", (4, 6), CODES), ValueError, r"needs float32 scale and bias of shape \(4,\), got no scale"),
    (("int8", (4, 6), CODES, QPARAM), ValueError, "got no bias"),
    (("int8", (4, 6), CODES, QPARAM.astype(np.float64), QPARAM), TypeError, "scale must have dtype"),
    (("int8", (4, 6), CODES, QPARAM, QPARAM[:3]), ValueError, r"bias must have one entry a row \(4\), got 3"),
    (("int8", (4, 6), CODES, torch.zeros(4), QPARAM), ValueError, "scale is on cpu but data is on the host"),
    (("int8", (4, 6), CODES, unaligned(QPARAM), QPARAM), ValueError, "scale and bias must be aligned"),
    (("int8", (4, 6), torch.zeros((4, 6), dtype=torch.uint8), QPARAM, QPARAM), ValueError,
     "scale is on the host but data is on cpu"),
])
def test_row_table_rejects_storage_that_does_not_hold_it(args, error, message):
    with pytest.raises(error, match=message):
        RowTable(*args)


def test_a_shape_larger_than_the_storage_never_reaches_the_kernels():
    """Index 999 passes the index check against shape (1000, 6): the kernel would read 996 rows past
    the buffer. Now the table cannot be made, and a tensor resized under a made table is caught."""
    indices, offsets = np.array([999], np.int64), np.array([0, 1], np.int64)
    with pytest.raises(ValueError, match="data has shape"):
        embedding_bag(RowTable("fp32", (1000, 6), F32), indices, offsets)
    with pytest.raises(ValueError, match="data has shape"):
        topk(np.ones((1, 6), np.float32), RowTable("fp32", (1000, 6), F32), 3)
    storage = torch.zeros((1000, 6))
    table = RowTable("fp32", (1000, 6), storage)
    storage.data = torch.zeros((4, 6))   # the same tensor object, other (smaller) storage
    with pytest.raises(ValueError, match="data has shape"):
        embedding_bag(table, torch.from_numpy(indices), torch.from_numpy(offsets))


def test_row_table_attributes_are_fixed(rng):
    table = quantize_rows(rng.standard_normal((5, 3)).astype(np.float32), "int8")
    for name in ("dtype", "shape", "data", "scale", "bias"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(table, name, getattr(table, name))
        with pytest.raises(AttributeError, match="immutable"):
            delattr(table, name)
    for twin in (copy.copy(table), copy.deepcopy(table), pickle.loads(pickle.dumps(table))):
        assert twin.shape == table.shape and np.array_equal(twin.dequantize(), table.dequantize())


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_storage_a_table_owns_is_read_only_and_a_callers_array_is_its_own(rng, dtype):
    weights = rng.standard_normal((7, 5)).astype(np.float32)
    table = quantize_rows(weights, dtype)
    owned = [table.data] + ([table.scale, table.bias] if table.scale is not None else [])
    if dtype == "fp32":
        assert table.data is weights and weights.flags.writeable   # the caller's array, read in place
    else:
        assert not any(part.flags.writeable for part in owned)
    if table.scale is not None:
        fused = table.fused()
        assert not any(part.flags.writeable for part in (fused.data, fused.scale, fused.bias))
    mine = weights.copy()
    wrapped = RowTable("fp32", mine.shape, mine)
    mine[2] = 7.0   # the caller's rows, written in place: seen by the next call
    got = embedding_bag(wrapped, np.array([2], np.int64), np.array([0, 1], np.int64))
    assert mine.flags.writeable and (got == 7.0).all()


@pytest.mark.filterwarnings("ignore:a fused table with")   # rows of 5 or 6 bytes move to torch in parts
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("dim", [5, 6, 64])
def test_every_layout_the_library_makes_is_accepted(rng, dtype, dim):
    """fused() rows whose qparams sit at addresses that are not multiples of 4, views of them on the
    host and as tensors, and the ItemIndex snapshots."""
    table = quantize_rows(rng.standard_normal((9, dim)).astype(np.float32), dtype)
    fused = table.fused()
    for same in (fused, fused.numpy(), fused.to("cpu"), fused.to("cpu").numpy(), table.to("cpu")):
        np.testing.assert_array_equal(np.asarray(same.dequantize()), table.dequantize())


MATRIX_CODES = np.zeros((4, 64), np.int8)
MATRIX_SCALES = np.ones((4, 2), np.float32)
Q8_BLOCKS = np.zeros((4, 2 * 34), np.uint8)


@pytest.mark.parametrize("args, kwargs, error, message", [
    (("int8", (1000, 64), MATRIX_CODES, MATRIX_SCALES), {"group_size": 32}, ValueError,
     r"data has shape \(4, 64\), but a matrix of shape \(1000, 64\) stored as int8 needs data of shape \(1000, 64\)"),
    (("int4", (4, 64), MATRIX_CODES.view(np.uint8), MATRIX_SCALES), {"group_size": 32}, ValueError,
     r"needs data of shape \(4, 32\)"),
    (("int3", (4, 64), MATRIX_CODES, MATRIX_SCALES), {"group_size": 32}, ValueError, "fmt must be one of"),
    (("int8", (4, 64), torch.zeros((4, 64), dtype=torch.int8), MATRIX_SCALES), {"group_size": 32}, TypeError,
     "data must be a NumPy array"),
    (("int8", (4, 64), MATRIX_CODES.view(np.uint8), MATRIX_SCALES), {"group_size": 32}, TypeError,
     "data must have dtype"),
    (("int8", (4, 64), MATRIX_CODES, MATRIX_SCALES), {"group_size": 0}, ValueError, "group_size must be a positive"),
    (("int4", (4, 64), MATRIX_CODES[:, :32].view(np.uint8).copy(), MATRIX_SCALES), {"group_size": 3}, ValueError,
     "even for int4"),
    (("int8", (4, 64), MATRIX_CODES, MATRIX_SCALES), {"group_size": 48}, ValueError, "multiple of group_size"),
    (("int8", (4, 64), MATRIX_CODES), {"group_size": 32}, ValueError, "needs float32 scales"),
    (("int8", (4, 64), MATRIX_CODES, MATRIX_SCALES[:, :1]), {"group_size": 32}, ValueError, "scales has shape"),
    (("int8", (4, 64), MATRIX_CODES, MATRIX_SCALES.astype(np.float64)), {"group_size": 32}, TypeError,
     "scales must have dtype"),
    (("int8", (4, 64), MATRIX_CODES, np.ones((2, 4), np.float32).T), {"group_size": 32}, ValueError,
     "scales must be C-contiguous"),
    (("int8", (4, 64), np.zeros((4, 128), np.int8)[:, ::2], MATRIX_SCALES), {"group_size": 32}, ValueError,
     "data must be C-contiguous"),
    (("q8_0", (4, 64), Q8_BLOCKS, MATRIX_SCALES), {"group_size": 32}, ValueError, "scales must be None"),
    (("q8_0", (4, 64), Q8_BLOCKS), {"group_size": 16}, ValueError, "its block's 32 weights"),
    (("q8_0", (4, 48), Q8_BLOCKS), {"group_size": 32}, ValueError, "multiple of the q8_0 block"),
    (("f32", (4, 6), unaligned(np.zeros((4, 24), np.uint8))), {}, ValueError, "start at a multiple of 4 bytes"),
])
def test_quantized_matrix_rejects_storage_that_does_not_hold_it(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        QuantizedMatrix(*args, **kwargs)


def test_quantized_matrix_is_immutable_and_leaves_the_callers_arrays_alone(rng):
    weight = rng.standard_normal((6, 64)).astype(np.float32)
    built = quantize_matrix(weight, "int8")
    codes, scales = built.data.copy(), built.scales.copy()
    qm = QuantizedMatrix("int8", (6, 64), codes, scales, group_size=32)
    assert codes.flags.writeable and not qm.data.flags.writeable and not qm.scales.flags.writeable
    for name in ("fmt", "shape", "data", "scales", "group_size", "prepared", "lock"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(qm, name, getattr(qm, name))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for twin in (copy.deepcopy(qm), pickle.loads(pickle.dumps(qm))):
        np.testing.assert_array_equal(qmatmul(x, twin), qmatmul(x, qm))
    blocks = rng.integers(0, 256, (6, 2 * 34), dtype=np.uint8)
    blocks[:, [0, 34]] = 0   # fp16 scales of 0 (finite)
    blocks[:, [1, 35]] = 0
    q8 = QuantizedMatrix("q8_0", (6, 64), blocks, group_size=32)
    np.testing.assert_array_equal(q8.dequantize(), matrix_reference.dequantize("q8_0", blocks, None, 32))
