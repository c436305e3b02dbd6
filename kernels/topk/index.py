"""ItemIndex: a live catalogue of item vectors searched with `topk`, on the host.

Copy-on-write snapshots: every add/remove builds a new immutable `_Snapshot` under the
writer lock and publishes it with one reference assignment, so a search (which reads
`self._snapshot` once) sees the old or the new catalogue, never a mix. Rows a snapshot
can see are never written again:
- add appends rows past the end (growing the buffers geometrically: amortised O(1) per
  row); an id that exists is retired and its new vector appended.
- remove retires rows (tombstones): a search excludes them through `topk`'s per-query
  exclusions; once they pass 1/32 of the rows the live rows are compacted into new buffers.
Equal scores go to the smaller external id, as in `topk`: the scan orders ties by storage
row, so a search asks for one candidate more than k, widens the list while the k-th and the
next score are equal, and re-sorts by (score, external id).
"""
import numbers
import threading

import numpy as np

from .._backend import dtype_name, is_tensor, like, read_only_view, to_numpy, to_numpy_float32
from .._rows import ROW_DTYPES, RowTable
from .._validate import FLOAT_DTYPES, INDEX_DTYPES, check_array, check_choice, check_finite, check_offsets
from ..quantize_rows import quantize_rows
from .search import METRICS, check_k, check_result_size, topk

COMPACT_FRACTION = 32   # compact once retired rows exceed 1/32 of the rows (and MIN_COMPACT)
MIN_COMPACT = 1024
FORMAT_VERSION = 1
ARGUMENT_ORDER = ("ItemIndex.add takes (ids, vectors), ids first, where FAISS's add_with_ids takes (vectors, ids): "
                  "pass them by name, add(ids=..., vectors=...)")


class _Snapshot:
    """One immutable state: rows [0, n) of the buffers, which of them are retired, and the ids."""

    __slots__ = ("table", "row_ids", "retired", "live_lookup", "n_live")

    def __init__(self, table, row_ids, retired):
        self.table = table          # RowTable viewing rows [0, n) of the buffers
        self.row_ids = row_ids      # int64 (n,): external id of each row
        self.retired = retired      # sorted int64 rows that are no longer searchable
        self.n_live = table.shape[0] - len(retired)
        self.live_lookup = None     # (sorted external ids, their rows), built on first use

    def rows_of(self, external_ids):
        """Rows of the live items among external_ids (unknown ids dropped)."""
        if self.live_lookup is None:  # racing builders compute the same value
            live = np.setdiff1d(np.arange(self.table.shape[0]), self.retired, assume_unique=True)
            order = np.argsort(self.row_ids[live], kind="stable")
            self.live_lookup = (self.row_ids[live][order], live[order])
        sorted_ids, rows = self.live_lookup
        at = np.minimum(np.searchsorted(sorted_ids, external_ids), max(len(sorted_ids) - 1, 0))
        found = sorted_ids[at] == external_ids if len(sorted_ids) else np.zeros(len(external_ids), bool)
        return rows[at], found


class ItemIndex:
    """Searchable item vectors with int64 external ids (see API.md): add, remove, search, len."""

    def __init__(self, dim, *, metric="ip", dtype="fp32"):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an integer, got {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        check_choice("metric", metric, METRICS)
        check_choice("dtype", dtype, ROW_DTYPES)
        self.dim = int(dim)
        self.metric = metric
        self.dtype = dtype
        self._lock = threading.Lock()
        empty = quantize_rows(np.zeros((0, self.dim), np.float32), dtype)
        self._buffers = [empty.data, empty.scale, empty.bias, np.zeros(0, np.int64)]
        self._row_of = {}  # writer-side map: external id -> its live row
        self._snapshot = _Snapshot(empty, np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self):
        return self._snapshot.n_live

    @property
    def nbytes(self):
        """Bytes of the buffers held (capacity, not only rows in use)."""
        return int(sum(b.nbytes for b in self._buffers if b is not None))

    def __repr__(self):
        return f"ItemIndex(dim={self.dim}, metric={self.metric!r}, dtype={self.dtype!r}, items={len(self)})"

    # ---- writes -------------------------------------------------------------------------

    def add(self, ids, vectors):
        """Add items (n,) int ids with float (n, dim) vectors; an existing id is replaced.

        The ids come first (FAISS's add_with_ids(x, ids) is the other way round): floats as ids or
        1-D integers as vectors raise TypeError saying so. Keywords work: add(ids=..., vectors=...).
        """
        self._check_argument_order(ids, vectors)
        check_array("ids", ids, 1, INDEX_DTYPES)
        check_array("vectors", vectors, 2, FLOAT_DTYPES)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have {self.dim} columns, got shape {tuple(vectors.shape)}")
        if vectors.shape[0] != ids.shape[0]:
            raise ValueError(f"ids has {ids.shape[0]} entries but vectors has {vectors.shape[0]} rows")
        check_finite("vectors", vectors)
        ids = to_numpy(ids).astype(np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in results), got {int(ids.min())}")
        # A repeated id keeps its last vector.
        reversed_unique, first = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - first)
        ids = ids[keep]
        rows = quantize_rows(to_numpy_float32(vectors)[keep], self.dtype)
        with self._lock:
            snap = self._snapshot
            n = snap.table.shape[0]
            replaced = [self._row_of[i] for i in ids.tolist() if i in self._row_of]
            self._reserve(n + len(ids))
            data, scale, bias, row_ids = self._buffers
            data[n:n + len(ids)] = rows.data
            if scale is not None:
                scale[n:n + len(ids)] = rows.scale
                bias[n:n + len(ids)] = rows.bias
            row_ids[n:n + len(ids)] = ids
            self._row_of.update(zip(ids.tolist(), range(n, n + len(ids))))
            retired = np.union1d(snap.retired, np.asarray(replaced, np.int64))
            self._publish(n + len(ids), retired)

    def _check_argument_order(self, ids, vectors):
        """TypeError for the two mistakes FAISS's argument order makes: float ids, 1-D integer vectors."""
        if (isinstance(ids, np.ndarray) or is_tensor(ids)) and dtype_name(ids) in FLOAT_DTYPES:
            raise TypeError(f"ids must be int32 or int64, got {dtype_name(ids)} of shape {tuple(ids.shape)}. "
                            + ARGUMENT_ORDER)
        if ((isinstance(vectors, np.ndarray) or is_tensor(vectors)) and dtype_name(vectors) in INDEX_DTYPES
                and vectors.ndim == 1):
            raise TypeError(f"vectors must be a float (n, {self.dim}) matrix, got 1-D {dtype_name(vectors)}. "
                            + ARGUMENT_ORDER)

    def remove(self, ids):
        """Remove items by id (unknown ids are ignored); returns how many were removed."""
        check_array("ids", ids, 1, INDEX_DTYPES)
        ids = np.unique(to_numpy(ids).astype(np.int64))
        with self._lock:
            gone = [row for row in (self._row_of.pop(i, None) for i in ids.tolist()) if row is not None]
            if gone:
                snap = self._snapshot
                self._publish(snap.table.shape[0], np.union1d(snap.retired, np.asarray(gone, np.int64)))
        return len(gone)

    def _reserve(self, rows):
        """Make the buffers hold at least `rows` rows, doubling (copies rows in use only)."""
        capacity = self._buffers[3].shape[0]
        if rows <= capacity:
            return
        capacity = max(rows, 2 * capacity, 64)
        n = self._snapshot.table.shape[0]
        grown = []
        for b in self._buffers:
            if b is None:
                grown.append(None)
                continue
            new = np.empty((capacity,) + b.shape[1:], b.dtype)
            new[:n] = b[:n]
            grown.append(new)
        self._buffers = grown

    def _publish(self, n, retired):
        """Swap in the snapshot of rows [0, n) minus `retired`, compacting if too many are retired."""
        if len(retired) > max(MIN_COMPACT, n // COMPACT_FRACTION):
            live = np.setdiff1d(np.arange(n), retired, assume_unique=True)
            self._buffers = [None if b is None else b[live] for b in self._buffers]
            self._row_of = dict(zip(self._buffers[3].tolist(), range(len(live))))
            n, retired = len(live), np.zeros(0, np.int64)
        # Read-only views: rows a snapshot can see are never written again (appends go past n).
        data, scale, bias, row_ids = (None if b is None else read_only_view(b[:n]) for b in self._buffers)
        self._snapshot = _Snapshot(RowTable(self.dtype, (n, self.dim), data, scale, bias), row_ids, retired)

    # ---- reads --------------------------------------------------------------------------

    def search(self, queries, k, *, exclude=None):
        """The k best items per query: (scores float32 (B, k), external ids int64 (B, k)), -1 padded.

        exclude: None or CSR (indptr, excluded external ids); unknown ids are ignored.
        """
        snap = self._snapshot
        kind = check_array("queries", queries, 2, FLOAT_DTYPES)
        if kind == "cuda":
            raise ValueError("ItemIndex lives on the host: pass NumPy arrays or CPU tensors as queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries must have {self.dim} columns, got shape {tuple(queries.shape)}")
        k = check_k(k)
        B = queries.shape[0]
        check_result_size(k, B, snap.table.shape[0])
        rows_exclude = self._row_exclusions(snap, B, exclude)
        n = snap.table.shape[0]
        wanted = k + 1 if k < n else k   # k >= n: every row is a candidate already (and k + 1 could pass the limit)
        while True:
            scores, rows = topk(to_numpy_float32(queries), snap.table, wanted, metric=self.metric, exclude=rows_exclude)
            tie_at_boundary = (rows[:, -1] >= 0) & (scores[:, -1] == scores[:, k - 1])
            if wanted >= n or not tie_at_boundary.any():
                break
            wanted = min(2 * wanted, n)
        ids = np.where(rows >= 0, snap.row_ids[np.maximum(rows, 0)], -1) if n else rows
        order_key = scores if self.metric == "l2" else -scores   # padding (+-inf) sorts last
        order = np.lexsort((ids, order_key), axis=-1)[:, :k]
        scores = np.take_along_axis(scores, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        return like(scores, kind), like(ids, kind)

    @staticmethod
    def _row_exclusions(snap, B, exclude):
        """Per-query CSR over rows: the retired rows, plus each query's excluded items."""
        retired = snap.retired
        if exclude is None:
            if len(retired) == 0:
                return None
            return np.arange(B + 1, dtype=np.int64) * len(retired), np.tile(retired, B)
        if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
            raise TypeError("exclude must be None or a pair (indptr, excluded_ids)")
        indptr, ids = exclude
        check_array("exclude[1] (excluded_ids)", ids, 1, INDEX_DTYPES)
        indptr = check_offsets("exclude[0] (indptr)", indptr, ids.shape[0], B)
        ids = to_numpy(ids).astype(np.int64)
        rows, found = snap.rows_of(ids)
        found_before = np.concatenate([[0], np.cumsum(found)])
        per_query = found_before[indptr[1:]] - found_before[indptr[:-1]]
        counts = per_query + len(retired)
        out_ptr = np.zeros(B + 1, np.int64)
        np.cumsum(counts, out=out_ptr[1:])
        query_of = np.repeat(np.arange(B), np.diff(indptr))[found]
        out = np.empty(out_ptr[-1], np.int64)
        # Each query's segment: its retired rows first, then its excluded live rows.
        starts = out_ptr[:-1]
        retired_slots = (starts[:, None] + np.arange(len(retired))).ravel()
        out[retired_slots] = np.tile(retired, B)
        rank = np.arange(len(query_of)) - np.searchsorted(query_of, query_of)
        out[starts[query_of] + len(retired) + rank] = rows[found]
        return out_ptr, out

    # ---- files ----------------------------------------------------------------------------

    def save(self, path):
        """Write the live items to `path` (NumPy .npz, no pickle)."""
        snap = self._snapshot
        live = np.setdiff1d(np.arange(snap.table.shape[0]), snap.retired, assume_unique=True)
        table = snap.table
        arrays = {"format_version": np.int64(FORMAT_VERSION), "dim": np.int64(self.dim),
                  "metric": np.str_(self.metric), "dtype": np.str_(self.dtype),
                  "ids": snap.row_ids[live], "data": table.data[live]}
        if table.scale is not None:
            arrays["scale"] = table.scale[live]
            arrays["bias"] = table.bias[live]
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path):
        """An index with the items saved by `save`."""
        with np.load(path, allow_pickle=False) as f:
            if int(f["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported ItemIndex format version {int(f['format_version'])}")
            index = cls(int(f["dim"]), metric=str(f["metric"]), dtype=str(f["dtype"]))
            ids, data = f["ids"], f["data"]
            scale = f["scale"] if "scale" in f else None
            bias = f["bias"] if "bias" in f else None
        n = len(ids)
        index._buffers = [data, scale, bias, ids]
        index._row_of = dict(zip(ids.tolist(), range(n)))
        index._publish(n, np.zeros(0, np.int64))
        return index
