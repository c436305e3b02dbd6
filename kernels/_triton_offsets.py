"""Element offsets for the Triton kernels, computed in int64.

Triton does `tl.program_id` and `tl.arange` arithmetic in int32, so a row number times a row
length wraps once a tensor passes 2**31 elements (a corpus of 10M rows of 256, a (65536, 32768)
activation, a (65536, 262144) logits output). Every offset a kernel forms as such a product goes
through these; tests/test_triton_offsets.py checks them past 2**31 under the interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def row_starts(rows, row_length):
    """rows * row_length in int64: where rows `rows` (any shape) start in a row-major buffer."""
    return rows.to(tl.int64) * row_length


@triton.jit
def matrix_offsets(rows, columns, row_length):
    """(len(rows), len(columns)) int64 offsets of elements (rows[i], columns[j]) of a row-major
    matrix whose rows are `row_length` elements apart."""
    return row_starts(rows, row_length)[:, None] + columns[None, :]
