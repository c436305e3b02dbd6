"""Input checks shared by every backend, with the error messages the contract promises.

Each check names the argument, and for indices the bag (or query) and the position, so a
caller can find the bad entry. The one-pass scans over offsets and indices run in C
(`recscore.bindings._checks`); on CUDA tensors the same checks run as torch reductions.
"""
import numbers

import numpy as np

from recscore.bindings import _checks

from ._backend import array_kind, dtype_name, to_numpy

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INDEX_DTYPES = ("int32", "int64")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_shape(name, shape):
    """A pair of non-negative integers (rows, columns), as Python ints."""
    try:
        rows, columns = shape
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of integers, got {shape!r}") from None
    if type(rows) is int and type(columns) is int and rows >= 0 and columns >= 0:   # the common case, fast
        return rows, columns
    for value in (rows, columns):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a pair of integers, got {shape!r}")
    if rows < 0 or columns < 0:
        raise ValueError(f"{name} must not be negative, got {tuple(shape)}")
    return int(rows), int(columns)


def check_array(name, x, ndim, dtypes):
    """Kind, rank and dtype of an array argument; returns its kind ('numpy', 'torch', 'cuda')."""
    try:
        kind = array_kind(x)
    except TypeError:
        raise TypeError(f"{name} must be a NumPy array or a torch.Tensor, got {type(x).__name__}") from None
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtype_name(x) not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(dtypes)}, got {dtype_name(x)}")
    if kind == "numpy" and not x.dtype.isnative:  # the kernels read native-order bytes
        raise TypeError(f"{name} must be in native byte order, got dtype {x.dtype.str!r}")
    return kind


def check_same_device(name, x, kind, device):
    """x must live where the main input lives (host, or the same CUDA device)."""
    x_kind = array_kind(x)
    on_cuda = x_kind == "cuda"
    if on_cuda != (kind == "cuda") or (on_cuda and x.device != device):
        where = str(x.device) if on_cuda else "the host"
        raise ValueError(f"{name} is on {where} but the main input is on {device or 'the host'}")


def check_finite(name, x):
    if array_kind(x) == "cuda":
        import torch
        ok = bool(torch.isfinite(x).all())
    else:
        values = to_numpy(x)
        if values.dtype == np.uint16:  # bf16 bits: exponent all ones is inf/nan
            ok = not bool(((values & 0x7F80) == 0x7F80).any())
        else:
            ok = bool(np.isfinite(values).all())
    if not ok:
        raise ValueError(f"{name} contains NaN or inf")


def check_offsets(name, offsets, n_items, n_segments):
    """offsets: int64 of length n_segments + 1, starting at 0, non-decreasing, ending at n_items."""
    check_array(name, offsets, 1, ("int64",))
    if offsets.shape[0] != n_segments + 1:
        raise ValueError(f"{name} must have length {n_segments + 1}, got {offsets.shape[0]}")
    host = np.ascontiguousarray(to_numpy(offsets))
    bad = _checks.first_bad_offset(host, n_items)
    if bad >= 0:
        if bad == 0:
            raise ValueError(f"{name}[0] must be 0, got {int(host[0])}")
        if bad == len(host) - 1 and host[bad] >= host[bad - 1] and host[bad] <= n_items:
            raise ValueError(f"{name}[-1] must equal the number of entries ({n_items}), got {int(host[bad])}")
        raise ValueError(
            f"{name} must be non-decreasing and within [0, {n_items}]: "
            f"{name}[{bad - 1}] = {int(host[bad - 1])}, {name}[{bad}] = {int(host[bad])}")
    return host


def locate(offsets_host, position):
    """The segment (bag or query) that holds entry `position`, and the slot inside it."""
    segment = int(np.searchsorted(offsets_host, position, side="right") - 1)
    return segment, int(position - offsets_host[segment])


def first_bad_index_on_device(indices, offsets_host, rows_per_table, bags_per_table):
    """The first position whose index is outside [-1, R_t), found with tensor reductions where
    `indices` lives (a CUDA tensor is never copied to the host), or -1."""
    import torch
    table_ends = offsets_host[bags_per_table::bags_per_table] if bags_per_table else np.zeros(len(rows_per_table), np.int64)
    per_table = np.diff(np.concatenate([[0], table_ends]))
    limit = torch.repeat_interleave(torch.as_tensor(rows_per_table, dtype=torch.int64, device=indices.device),
                                    torch.as_tensor(per_table, device=indices.device))
    bad = (indices < -1) | (indices >= limit)
    if not bool(bad.any()):
        return -1
    return int(torch.nonzero(bad)[0, 0])


def first_bad_bag_index(indices, offsets_host, rows_per_table, bags_per_table):
    """The first position whose index of table t lies outside [-1, R_t), or -1: scanned in C on the
    host, with tensor reductions where a CUDA tensor lives (never copied to the host)."""
    rows = np.asarray(rows_per_table, dtype=np.int64)
    if array_kind(indices) == "cuda":
        return first_bad_index_on_device(indices, offsets_host, rows, bags_per_table)
    return _checks.first_bad_index(np.ascontiguousarray(to_numpy(indices)), offsets_host, rows, bags_per_table)


def check_bag_indices(indices, offsets_host, rows_per_table, bags_per_table, table_names=None):
    """Every index of table t must lie in [-1, R_t); IndexError names table, bag and position."""
    bad = first_bad_bag_index(indices, offsets_host, rows_per_table, bags_per_table)
    if bad < 0:
        return
    rows = np.asarray(rows_per_table, dtype=np.int64)
    value = int(indices[bad])
    segment, slot = locate(offsets_host, bad)
    table, bag = divmod(segment, bags_per_table) if bags_per_table else (0, segment)
    where = f"bag {bag}, position {slot}"
    if table_names is not None:
        where = f"{table_names[table]}, " + where
    raise IndexError(
        f"indices[{bad}] = {value} ({where}) is out of range for a table of "
        f"{int(rows[table])} rows (valid: -1 for padding, 0..{int(rows[table]) - 1})")


def check_exclude(exclude, n_queries, n_items, id_name="corpus row"):
    """exclude: None or a CSR pair (indptr, excluded_ids) with len(indptr) == n_queries + 1.

    Returns host int64 (indptr, ids), or None. Ids must lie in [0, n_items).
    """
    if exclude is None:
        return None
    if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
        raise TypeError("exclude must be None or a pair (indptr, excluded_ids)")
    indptr, ids = exclude
    check_array("exclude[1] (excluded_ids)", ids, 1, INDEX_DTYPES)
    indptr_host = check_offsets("exclude[0] (indptr)", indptr, ids.shape[0], n_queries)
    ids_host = np.ascontiguousarray(to_numpy(ids)).astype(np.int64, copy=False)
    bad = _checks.first_out_of_range(ids_host, 0, n_items)
    if bad >= 0:
        query, slot = locate(indptr_host, bad)
        raise IndexError(
            f"excluded_ids[{bad}] = {int(ids_host[bad])} (query {query}, position {slot}) is not a "
            f"{id_name} id: valid ids are 0..{n_items - 1}")
    return indptr_host, ids_host
