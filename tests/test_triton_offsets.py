"""Triton offsets past 2**31 elements, without allocating gigabytes: the int64 offset helpers every
kernel forms its row offsets with (kernels/_triton_offsets.py), at row numbers whose products wrap
in int32, and an embedding lookup whose rows lie 1-4 GiB into a sparse file (address space, not
memory)."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from recscore.kernels import embedding_bag, use_backend
from recscore.kernels._triton_offsets import matrix_offsets, row_starts

ROWS, COLUMNS = 8, 4


@triton.jit
def _offsets_kernel(first_row, row_length, starts_out, offsets_out, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    rows = first_row + tl.arange(0, ROWS)   # int32, as the kernels' program ids and aranges are
    tl.store(starts_out + tl.arange(0, ROWS), row_starts(rows, row_length))
    at = tl.arange(0, ROWS)[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :]
    tl.store(offsets_out + at, matrix_offsets(rows, tl.arange(0, COLUMNS), row_length))


@pytest.mark.parametrize("first_row, row_length", [
    (2**31 // 256 - 4, 256),      # a corpus of 8M rows of 256: rows 8388608 on start at 2**31
    (9, 2**28),                   # few rows, each 2**28 long
    (65528, 262144),              # the last rows of a (65536, 262144) logits output (2**34 elements)
    (2**31 - ROWS - 1, 3),        # row numbers at the top of int32
])
def test_offsets_past_2_31_are_exact(triton_device, first_row, row_length):
    starts = torch.zeros(ROWS, dtype=torch.int64, device=triton_device)
    offsets = torch.zeros((ROWS, COLUMNS), dtype=torch.int64, device=triton_device)
    _offsets_kernel[(1,)](first_row, row_length, starts, offsets, ROWS=ROWS, COLUMNS=COLUMNS)
    want = np.arange(first_row, first_row + ROWS, dtype=np.int64) * row_length
    assert want.max() >= 2**31   # the case wraps in int32
    np.testing.assert_array_equal(starts.cpu().numpy(), want)
    np.testing.assert_array_equal(offsets.cpu().numpy(), want[:, None] + np.arange(COLUMNS))


def test_lookup_reads_rows_past_2_31_bytes(tmp_path, triton_device):
    """Rows 1 GiB apart in a sparse file: rows 2-4 start 2-4 GiB in (byte offsets past 2**31)."""
    if triton_device != "cpu":
        pytest.skip("the table is a host memory map, read by the interpreter")
    row_stride, rows, dim = 2**28, 5, 4   # float32 elements
    with open(tmp_path / "table.bin", "w+b") as f:
        f.truncate(((rows - 1) * row_stride + dim) * 4)   # a hole: no disk, no memory until written
        space = np.memmap(f, np.float32, "r+")
    table = torch.from_numpy(space).as_strided((rows, dim), (row_stride, 1))
    values = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    table.copy_(torch.from_numpy(values))
    indices, offsets = np.array([4, 2, 3, 0, -1, 4]), np.array([0, 2, 3, 6])
    with use_backend("reference"):
        want = embedding_bag(values, indices, offsets)
    with use_backend("triton"):
        got = embedding_bag(table, torch.from_numpy(indices), torch.from_numpy(offsets))
    np.testing.assert_array_equal(got.numpy(), want)
