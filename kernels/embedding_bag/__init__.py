"""Pooled embedding-bag lookup over one table (`embedding_bag`) or many (`TableBatch`)."""
import threading

import numpy as np

from .._backend import backend_module, choose_backend, like, to_numpy
from .._rows import as_row_table
from .._validate import (INDEX_DTYPES, check_array, check_bag_indices, check_choice, check_finite, check_offsets,
                         check_same_device, first_bad_bag_index)

POOLINGS = ("sum", "mean", "max")
BOUNDS = ("error", "skip")


class TableBatch:
    """Many embedding tables looked up in one pass (FBGEMM's table-batched embeddings).

    Tables may differ in R, D and dtype; they must all live on the host or all on one
    CUDA device. Tables are read in place: a host table that starts on a 64-byte line (new
    quantize_rows storage, torch tensors, aligned_empty) reads fewer lines than one where
    NumPy puts it (see README).
    Backends may keep derived layouts (packed buffers, pointer arrays) in `prepared`, built
    once under `lock`.
    """

    def __init__(self, tables):
        if not isinstance(tables, (list, tuple)) or len(tables) == 0:
            raise ValueError("tables must be a non-empty list of tables")
        self.tables = [as_row_table(t, f"tables[{i}]") for i, t in enumerate(tables)]
        devices = {t.device for t in self.tables}
        on_cuda = {t.kind == "cuda" for t in self.tables}
        if len(on_cuda) > 1 or (True in on_cuda and len(devices) > 1):
            raise ValueError(f"tables must all live on the host or all on one CUDA device, got {sorted(map(str, devices))}")
        self.prepared = {}
        self.lock = threading.Lock()

    @property
    def num_tables(self):
        return len(self.tables)

    @property
    def dims(self):
        return [t.shape[1] for t in self.tables]

    @property
    def rows(self):
        return [t.shape[0] for t in self.tables]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.tables)

    @property
    def table_names(self):
        """How index errors name the table: None for a single table."""
        return [f"table {i}" for i in range(self.num_tables)] if self.num_tables > 1 else None

    @property
    def device(self):
        return self.tables[0].device

    def lookup(self, indices, offsets, *, pooling="sum", per_sample_weights=None, bounds="error"):
        """Pooled bags of every table: float32 (B, sum of D_t), tables side by side in order.

        offsets is table-major with T*B + 1 entries: bag b of table t is
        indices[offsets[t*B + b] : offsets[t*B + b + 1]].
        """
        return _lookup(self, indices, offsets, pooling, per_sample_weights, bounds)

    def lookup_with_flags(self, indices, offsets, *, pooling="sum", per_sample_weights=None, flags=None):
        """`lookup` on CUDA tensors without waiting for the GPU, so that CUDA graphs can capture it
        (FBGEMM's bounds-check "warning" mode): returns (out, flags), flags int32 (3,) on the device.

        flags[0] != 0: `offsets` was malformed, and `out` is undefined (no memory outside the
        inputs is read). flags[1] != 0: some index lay outside [-1, R_t) and was skipped, as with
        bounds="skip". flags[2] != 0: a per-sample weight was NaN or inf. `lookup` reads these
        flags itself (one wait per call) and raises; here the caller checks them when convenient.
        With nothing to launch (no bags, or tables of D = 0) the checks run on the host instead:
        bad offsets or weights raise there, and out-of-range indices are flagged.
        The first call for a new set of tables copies their layout to the device (a wait): make
        it before capturing a graph.

        flags: None (each call returns new zeroed flags), or a contiguous int32 (3,) tensor on the
        tables' device that the call sets its flags in and returns, clearing none (FBGEMM's
        persistent bounds-check warning counter): no allocation and no zero fill a call, so a
        lookup is one kernel (in a graph of B = 2048 lookups on an H100 the fill took 1.3 of 10.8 us
        a call). The caller zeroes it after reading a set flag.
        """
        return _lookup(self, indices, offsets, pooling, per_sample_weights, "skip", with_flags=True, flags=flags)

    def __repr__(self):
        return f"TableBatch(num_tables={self.num_tables}, dims={self.dims}, nbytes={self.nbytes})"


def embedding_bag(table, indices, offsets, *, pooling="sum", per_sample_weights=None, bounds="error"):
    """Pooled lookup of bags of rows of one table: float32 (B, D), B = len(offsets) - 1."""
    return _lookup(TableBatch([table]), indices, offsets, pooling, per_sample_weights, bounds)


def _lookup(batch, indices, offsets, pooling, per_sample_weights, bounds, with_flags=False, flags=None):
    """embedding_bag, lookup and lookup_with_flags: check the call, then run it where the data lives."""
    kind, device, bags = _check_call(batch, indices, offsets, pooling, per_sample_weights, bounds)
    backend = choose_backend(kind)
    if backend == "triton" and kind == "numpy":
        raise ValueError("the triton backend takes torch tensors (CPU tensors under TRITON_INTERPRET=1), "
                         "got NumPy indices")
    if with_flags:
        _check_flags(backend, kind, device, flags)
    if backend == "triton" and bags > 0 and sum(batch.dims) > 0:
        return _lookup_on_gpu(batch, indices, offsets, bags, pooling, per_sample_weights, bounds, with_flags, flags,
                              kind, device)
    offsets_host = check_offsets("offsets", offsets, indices.shape[0], batch.num_tables * bags)
    if per_sample_weights is not None:
        check_finite("per_sample_weights", per_sample_weights)
    if backend == "triton":
        return _lookup_nothing_to_launch(batch, indices, offsets_host, bags, bounds, with_flags, flags, kind, device)
    if bounds == "error" and backend == "reference":  # the CPU kernel checks indices in its own pass
        check_bag_indices(indices, offsets_host, batch.rows, bags, batch.table_names)
    weights = None if per_sample_weights is None else np.ascontiguousarray(to_numpy(per_sample_weights))
    out = backend_module(__name__, backend).lookup(batch, np.ascontiguousarray(to_numpy(indices)), offsets_host, bags,
                                                   pooling, weights, bounds)
    return like(out, kind, device)


def _check_call(batch, indices, offsets, pooling, per_sample_weights, bounds):
    """The checks every backend makes first; returns the kind of `indices`, its CUDA device (or
    None) and the bags per table, B."""
    check_choice("pooling", pooling, POOLINGS)
    check_choice("bounds", bounds, BOUNDS)
    kind = check_array("indices", indices, 1, INDEX_DTYPES)
    device = indices.device if kind == "cuda" else None
    check_same_device("the tables", batch.tables[0].data, kind, device)
    check_array("offsets", offsets, 1, ("int64",))
    check_same_device("offsets", offsets, kind, device)
    tables = batch.num_tables
    if (offsets.shape[0] - 1) % tables != 0 or offsets.shape[0] == 0:
        raise ValueError(f"offsets must have length T*B + 1 for T = {tables} tables, got {offsets.shape[0]}")
    if per_sample_weights is not None:
        if pooling != "sum":
            raise ValueError(f"per_sample_weights is only supported with pooling='sum', got pooling={pooling!r}")
        check_array("per_sample_weights", per_sample_weights, 1, ("float32",))
        check_same_device("per_sample_weights", per_sample_weights, kind, device)
        if per_sample_weights.shape[0] != indices.shape[0]:
            raise ValueError(f"per_sample_weights must have the length of indices ({indices.shape[0]}), "
                             f"got {per_sample_weights.shape[0]}")
    return kind, device, (offsets.shape[0] - 1) // tables


def _check_flags(backend, kind, device, flags):
    """lookup_with_flags runs on the Triton backend; `flags`, if given, is where its kernel sets them."""
    if backend != "triton":
        raise ValueError(f"lookup_with_flags runs the Triton kernel on CUDA tensors; got {kind} inputs "
                         f"on the {backend} backend (use lookup)")
    if flags is None:
        return
    if check_array("flags", flags, 1, ("int32",)) == "numpy":
        raise TypeError("flags must be a torch.Tensor on the tables' device, got a NumPy array")
    check_same_device("flags", flags, kind, device)
    if flags.shape[0] != 3 or not flags.is_contiguous():
        raise ValueError(f"flags must be a contiguous int32 tensor of 3 elements, got shape "
                         f"{tuple(flags.shape)} and strides {flags.stride()}")


def _lookup_on_gpu(batch, indices, offsets, bags, pooling, per_sample_weights, bounds, with_flags, flags, kind,
                   device):
    """The Triton kernel checks offsets, indices and weights as it reads them. `lookup` reads its
    flags back (the call's only wait for the GPU) and raises; lookup_with_flags returns them."""
    indices, offsets = indices.contiguous(), offsets.contiguous()   # copies only strided views
    if per_sample_weights is not None:
        per_sample_weights = per_sample_weights.contiguous()
    triton_lookup = backend_module(__name__, "triton")
    if with_flags:
        return triton_lookup.lookup(batch, indices, offsets, bags, pooling, per_sample_weights, flags)
    flags = triton_lookup.thread_flags(batch)
    try:
        out, _ = triton_lookup.lookup(batch, indices, offsets, bags, pooling, per_sample_weights, flags)
        bad_offsets, bad_index, bad_weight = triton_lookup.read_thread_flags(flags)
    except BaseException:
        triton_lookup.clear_flags(flags)   # whatever the kernel set: the thread's next call starts clean
        raise
    if bad_offsets or bad_weight or (bad_index and bounds == "error"):
        _raise_flagged_input(batch, indices, offsets, bags, per_sample_weights, bounds)
    return like(out, kind, device)


def _raise_flagged_input(batch, indices, offsets, bags, per_sample_weights, bounds):
    """Word the error the kernel flagged with the host checks, in the order every backend checks:
    offsets, weights, indices."""
    offsets_host = check_offsets("offsets", offsets, indices.shape[0], batch.num_tables * bags)
    if per_sample_weights is not None:
        check_finite("per_sample_weights", per_sample_weights)
    if bounds == "error":
        check_bag_indices(indices, offsets_host, batch.rows, bags, batch.table_names)
    raise RuntimeError("embedding_bag: the Triton kernel flagged an input that the host checks accept (a kernel bug)")


def _lookup_nothing_to_launch(batch, indices, offsets_host, bags, bounds, with_flags, flags, kind, device):
    """A Triton-backend call with no bags, or tables of D = 0 only: zeros, with the index check
    (or, for lookup_with_flags, its flag) made on the host."""
    if bounds == "error":
        check_bag_indices(indices, offsets_host, batch.rows, bags, batch.table_names)
    out = like(np.zeros((bags, sum(batch.dims)), np.float32), kind, device)
    if not with_flags:
        return out
    bad_index = int(first_bad_bag_index(indices, offsets_host, batch.rows, bags) >= 0)
    if flags is None:
        return out, like(np.array([0, bad_index, 0], np.int32), kind, device)
    if bad_index:
        flags[1] = 1
    return out, flags
