# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""One-pass input checks in C: offsets/indptr layout, index ranges per table, CSR ids.

Each function returns the position of the first violation, or -1; the Python caller turns
that position into an error message naming the argument, the bag (or query) and the slot.
"""
from libc.stdint cimport int32_t, int64_t

ctypedef fused index_t:
    int32_t
    int64_t


cdef Py_ssize_t _first_bad_offset(const int64_t[::1] offsets, int64_t n_items) noexcept nogil:
    cdef Py_ssize_t i, n = offsets.shape[0]
    if n == 0 or offsets[0] != 0:
        return 0
    for i in range(1, n):
        if offsets[i] < offsets[i - 1] or offsets[i] > n_items:
            return i
    if offsets[n - 1] != n_items:
        return n - 1
    return -1


def first_bad_offset(const int64_t[::1] offsets, int64_t n_items):
    """First i where offsets breaks `offsets[0] == 0`, non-decreasing, `offsets[-1] == n_items`."""
    cdef Py_ssize_t bad
    with nogil:
        bad = _first_bad_offset(offsets, n_items)
    return bad


cdef Py_ssize_t _first_bad_index(const index_t[::1] indices, const int64_t[::1] offsets,
                                 const int64_t[::1] rows_per_table, int64_t bags_per_table) noexcept nogil:
    cdef Py_ssize_t t, i
    cdef int64_t v, rows
    for t in range(rows_per_table.shape[0]):
        rows = rows_per_table[t]
        for i in range(offsets[t * bags_per_table], offsets[(t + 1) * bags_per_table]):
            v = indices[i]
            if v < -1 or v >= rows:
                return i
    return -1


def first_bad_index(const index_t[::1] indices, const int64_t[::1] offsets,
                    const int64_t[::1] rows_per_table, int64_t bags_per_table):
    """First position i whose index is outside [-1, R_t) for the table t that owns it.

    `offsets` is table-major, with `bags_per_table` bags for each of the len(rows_per_table) tables,
    and must pass first_bad_offset (ValueError otherwise: the scan reads indices by it).
    """
    if bags_per_table < 0 or offsets.shape[0] != rows_per_table.shape[0] * bags_per_table + 1:
        raise ValueError(f"offsets must have len(rows_per_table) * bags_per_table + 1 = "
                         f"{rows_per_table.shape[0] * bags_per_table + 1} entries, got {offsets.shape[0]}")
    cdef Py_ssize_t bad_offset, bad = -1
    with nogil:
        bad_offset = _first_bad_offset(offsets, indices.shape[0])
        if bad_offset < 0:
            bad = _first_bad_index(indices, offsets, rows_per_table, bags_per_table)
    if bad_offset >= 0:
        raise ValueError(f"offsets[{bad_offset}] breaks offsets[0] == 0, non-decreasing, offsets[-1] == "
                         f"len(indices) = {indices.shape[0]}")
    return bad


cdef Py_ssize_t _first_out_of_range(const index_t[::1] values, int64_t low, int64_t high) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t v
    for i in range(values.shape[0]):
        v = values[i]
        if v < low or v >= high:
            return i
    return -1


def first_out_of_range(const index_t[::1] values, int64_t low, int64_t high):
    """First position i with values[i] outside [low, high)."""
    cdef Py_ssize_t bad
    with nogil:
        bad = _first_out_of_range(values, low, high)
    return bad
