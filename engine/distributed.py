"""recscore on a Ray cluster: a catalogue sharded over many machines, and engine replicas behind Ray Serve.

    pip install 'recscore[ray]'

    import ray, recscore.distributed as rd
    ray.init()                                          # or ray.init(address="auto") on a cluster
    index = rd.ShardedIndex.from_bundle("ml.bundle", num_shards=4)     # or .from_array(corpus, 4)
    scores, ids = index.topk(queries, k=10, exclude=(indptr, excluded_ids))
    index.add(ids, vectors); index.remove(ids)          # routed to the owning shard, a new epoch each

    serve run recscore.distributed:build_app bundle=ml.bundle replicas=2     # the engine behind Ray Serve

Sharded retrieval (`ShardedIndex`): shard s owns the contiguous global ids [bounds[s], bounds[s + 1])
(the last shard also owns every id past the initial corpus, so live additions land there); one Ray
actor per shard maps its rows read-only (a bundle's safetensors file memory-mapped on its own
machine, or an array's slice in Ray's shared-memory object store) and answers a query batch with
its own exact `recscore.kernels.topk` of k (not k / shards) as (score, global id). Each score is
computed from its row and the query alone, so the shard's scores are the single-machine scores bit
for bit; one merge orders every shard's candidates by (score best first, then smaller id), the
contract's order, and keeps k, padding with id -1 and -inf (+inf for "l2"): the answer equals
`topk(queries, corpus, k, metric=..., exclude=...)` on one machine, scores and ids.

Versions: every write (add, remove) makes a new corpus epoch on every shard (the owning shard
applies the change, the others only move their epoch), and each shard stamps its answer with its
epoch. Answers of different epochs are never merged: the query is asked again (a write was in
flight) and, when the shards still disagree after `retries`, `EpochMismatch` is raised. A shard
actor that dies (its process or machine gone) mid-query is re-created from its source with its
writes replayed and the query asked again (`respawn=True`, the default), or `ShardUnavailable` is
raised: never a partial answer.

Serving (`SharedEngine`, `build_app`): a Ray Serve deployment of `recscore.Engine` with request
batching (`@serve.batch` -> one `recommend_many`) and N replicas. Feedback lives in a store every
replica shares (`SharedSQLiteState`: the engine's SQLite database on a disk all replicas see, with a
change log); before each request a replica reads the log's new entries and drops the users other
replicas wrote for from its cache, so feedback sent to one replica is seen by the next request on
any replica. `retrieval_deployment` serves the retrieval stage alone over a ShardedIndex's shard
actors, batching single queries into one search. Guide: docs/distributed.md.

The core package never imports Ray: this module imports it only when a Ray object is made.
"""
import asyncio
import collections
import dataclasses
import math
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from recscore.kernels import quantize_rows, topk
from recscore.kernels._backend import like, to_numpy_float32
from recscore.kernels._rows import ROW_DTYPES, RowTable, as_row_table
from recscore.kernels._validate import FLOAT_DTYPES, check_array, check_choice, check_exclude, check_finite
from recscore.kernels.topk import METRICS, check_k
from recscore.kernels.topk.search import check_result_size

from .engine import STATE_FILE, Engine
from .state import SQLiteState

RAY_MISSING = "recscore.distributed needs Ray, which is not installed: pip install 'recscore[ray]'"
RETRIES = 8              # times a query is asked again while the shards answer at different epochs
RETRY_WAIT_S = 0.002     # first pause between those tries (doubling)
DEFAULT_ARRAY = ("puresvd.safetensors", "item_vectors")   # a bundle's retrieval vectors
INLINE_BYTES = 64 << 10  # queries up to this size go inside each shard's task, larger ones once to the object store
BATCH_SIZE = 64          # Serve: requests per batch
BATCH_WAIT_S = 0.002     # Serve: how long a batch waits to fill


class ShardUnavailable(RuntimeError):
    """A shard actor died during a query or a write and could not be (or may not be) re-created."""


class EpochMismatch(RuntimeError):
    """The shards kept answering at different corpus epochs: no answer mixes versions."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


# ---- the merge -----------------------------------------------------------------------------------

def merge_topk(parts, k, metric, num_queries=None):
    """The best k of several (scores (B, k_i), ids (B, k_i)) candidate lists with distinct ids, in the
    contract's order: score best first (largest for "ip"/"cosine", smallest for "l2"), ties to the
    smaller id, then padding (id -1, score -inf, +inf for "l2")."""
    check_choice("metric", metric, METRICS)
    B = parts[0][0].shape[0] if parts else int(num_queries or 0)
    fill = np.float32(np.inf if metric == "l2" else -np.inf)
    out_scores = np.full((B, k), fill, np.float32)
    out_ids = np.full((B, k), -1, np.int64)
    if B == 0 or not parts:
        return out_scores, out_ids
    scores = np.concatenate([np.asarray(p[0], np.float32) for p in parts], axis=1)
    ids = np.concatenate([np.asarray(p[1], np.int64) for p in parts], axis=1)
    key = scores if metric == "l2" else -scores           # padding: +inf, after every finite score
    # padding last even where it meets an equal key: ids of padding are moved past every real id
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie, key), axis=-1)[:, :k]
    taken = order.shape[1]
    out_scores[:, :taken] = np.take_along_axis(scores, order, axis=1)
    out_ids[:, :taken] = np.take_along_axis(ids, order, axis=1)
    padding = out_ids < 0
    out_scores[padding] = fill
    return out_scores, out_ids


def split_exclusions(indptr, ids, bounds):
    """Per shard s, the CSR (indptr, ids) of the excluded ids it owns ([bounds[s], bounds[s + 1]), the
    last shard everything from bounds[-2] on); None where there are no exclusions at all."""
    if indptr is None:
        return [None] * (len(bounds) - 1)
    B = len(indptr) - 1
    query_of = np.repeat(np.arange(B), np.diff(indptr))
    shard_of = np.searchsorted(np.asarray(bounds[1:-1], np.int64), ids, side="right")
    out = []
    for s in range(len(bounds) - 1):
        mine = shard_of == s
        ptr = np.zeros(B + 1, np.int64)
        np.cumsum(np.bincount(query_of[mine], minlength=B), out=ptr[1:])
        out.append((ptr, np.ascontiguousarray(ids[mine])))
    return out


# ---- one shard -----------------------------------------------------------------------------------

class Shard:
    """The rows of one shard and its top-k: base rows [lo, hi) read in place (read-only), plus rows
    added live (stored as quantize_rows(vectors, dtype)); removed or replaced base rows are excluded.
    Runs inside a Ray actor (`ShardedIndex`), and on its own in the tests."""

    def __init__(self, source, lo, metric, threads=None):
        if threads is not None:   # before the first kernel call: the scan's OpenMP threads
            os.environ["NUMBA_NUM_THREADS"] = str(int(threads))
            os.environ["OMP_NUM_THREADS"] = str(int(threads))
        self.base = _load_source(source)
        self.lo = int(lo)
        self.hi = self.lo + self.base.shape[0]
        self.metric = metric
        self.dtype = self.base.dtype
        self.dim = self.base.shape[1]
        self.epoch = 0
        self.retired = np.zeros(0, np.int64)             # sorted local base rows not served
        self.extra_ids = np.zeros(0, np.int64)           # global ids of the added rows, in row order
        self.extra_vectors = np.zeros((0, self.dim), np.float32)
        self.extra = None                                # RowTable of the added rows
        self._extra_lookup = {}                          # added id -> its row

    def info(self):
        return {"lo": self.lo, "hi": self.hi, "rows": self.base.shape[0] - len(self.retired) + len(self.extra_ids),
                "added": len(self.extra_ids), "epoch": self.epoch, "dtype": self.dtype, "pid": os.getpid(),
                "nbytes": int(self.base.nbytes + (self.extra.nbytes if self.extra is not None else 0))}

    def ping(self):
        return self.epoch

    def apply(self, epoch, op=None, ids=None, vectors=None, replay=False):
        """Move to `epoch` (the next one: epoch == self.epoch + 1, unless replaying), applying
        op "add" (ids, vectors: an existing id is replaced) or "remove" (ids; unknown ids ignored)."""
        if epoch != self.epoch + 1 and not (replay and epoch > self.epoch):
            raise RuntimeError(f"shard [{self.lo}, ...): write for epoch {epoch} but the shard is at epoch "
                               f"{self.epoch} (two writers, or a write was lost)")
        removed = 0
        if op == "add":
            ids = np.asarray(ids, np.int64)
            removed = self._drop(ids)
            self.extra_ids = np.concatenate([self.extra_ids, ids])
            self.extra_vectors = np.concatenate([self.extra_vectors, np.asarray(vectors, np.float32)])
            self.extra = quantize_rows(self.extra_vectors, self.dtype)
            self._extra_lookup = {int(i): r for r, i in enumerate(self.extra_ids)}
        elif op == "remove":
            removed = self._drop(np.asarray(ids, np.int64))
        elif op is not None:
            raise ValueError(f"op must be 'add', 'remove' or None, got {op!r}")
        self.epoch = int(epoch)
        return removed

    def _drop(self, ids):
        """Stop serving these ids (base rows retired, added rows deleted); returns how many were live."""
        base = ids[(ids >= self.lo) & (ids < self.hi)] - self.lo
        fresh = np.setdiff1d(base, self.retired)
        self.retired = np.union1d(self.retired, fresh)
        gone = np.isin(self.extra_ids, ids)
        if gone.any():
            self.extra_ids = self.extra_ids[~gone]
            self.extra_vectors = self.extra_vectors[~gone]
            self.extra = quantize_rows(self.extra_vectors, self.dtype) if len(self.extra_ids) else None
            self._extra_lookup = {int(i): r for r, i in enumerate(self.extra_ids)}
        return len(fresh) + int(gone.sum())

    def search(self, queries, k, exclude=None, metric=None):
        """(epoch, scores (B, k), global ids (B, k)): this shard's exact top-k. queries float32 (B, d);
        exclude None or a CSR (indptr, global ids) of ids this shard owns; metric: default the shard's."""
        metric = metric or self.metric
        queries = np.asarray(queries, np.float32)
        B = queries.shape[0]
        ptr, ids = exclude if exclude is not None else (np.zeros(B + 1, np.int64), np.zeros(0, np.int64))
        query_of = np.repeat(np.arange(B), np.diff(ptr))
        in_base = (ids >= self.lo) & (ids < self.hi)
        parts = []
        if self.base.shape[0]:
            base_ids, base_q = ids[in_base] - self.lo, query_of[in_base]
            if len(self.retired):
                base_ids = np.concatenate([base_ids, np.tile(self.retired, B)])
                base_q = np.concatenate([base_q, np.repeat(np.arange(B), len(self.retired))])
            csr = _csr(base_q, base_ids, B) if len(base_ids) else None
            scores, rows = topk(queries, self.base, k, metric=metric, exclude=csr)
            parts.append((scores, np.where(rows >= 0, rows + self.lo, -1)))
        if self.extra is not None:   # an added id may also replace a base row: every excluded id is looked up
            lookup = self._extra_lookup
            extra_q, extra_rows = [], []
            for q, i in zip(query_of.tolist(), ids.tolist()):
                r = lookup.get(i)
                if r is not None:
                    extra_q.append(q)
                    extra_rows.append(r)
            csr = _csr(np.array(extra_q, np.int64), np.array(extra_rows, np.int64), B) if extra_q else None
            scores, rows = topk(queries, self.extra, k, metric=metric, exclude=csr)
            parts.append((scores, np.where(rows >= 0, self.extra_ids[np.maximum(rows, 0)], -1)))
        scores, out = merge_topk(parts, k, metric, B) if len(parts) != 1 else parts[0]
        return self.epoch, scores, out


def _csr(query_of, ids, B):
    order = np.argsort(query_of, kind="stable")
    ptr = np.zeros(B + 1, np.int64)
    np.cumsum(np.bincount(query_of, minlength=B), out=ptr[1:])
    return ptr, np.ascontiguousarray(ids[order], np.int64)


def _load_source(source):
    """A shard's base rows from its source: ("rows", dtype, shape, data, scale, bias) (arrays, from
    Ray's object store: read-only shared memory) or ("bundle", path, file, array, lo, hi, dtype, verify)."""
    if source[0] == "rows":
        _, dtype, shape, *arrays = source
        ray = _ray()
        data, scale, bias = (ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in arrays)   # zero copy
        return RowTable(dtype, shape, data, scale, bias)
    if source[0] != "bundle":
        raise ValueError(f"unknown shard source {source[0]!r}")
    from .bundle import MANIFEST, map_safetensors, sha256_of
    import json
    _, path, file, name, lo, hi, dtype, verify = source
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    entry = manifest.get("files", {}).get(file)
    if not isinstance(entry, dict):
        raise ValueError(f"{path / MANIFEST}: no entry for {file}")
    if verify and sha256_of(path / file) != entry["sha256"]:
        raise ValueError(f"{path / file}: sha256 does not match the manifest (damaged or replaced)")
    arrays = map_safetensors(path / file, entry.get("arrays", {}))
    if name not in arrays:
        raise ValueError(f"{path / file}: no array {name!r} (has {sorted(arrays)})")
    rows = arrays[name][lo:hi]                            # a read-only memory map of this shard's rows
    if rows.ndim != 2:
        raise ValueError(f"{path / file}: array {name!r} must be 2-D, got shape {rows.shape}")
    if dtype == "fp32" and rows.dtype == np.float32:
        return RowTable("fp32", rows.shape, rows)
    return quantize_rows(np.asarray(rows, np.float32), dtype)   # stored in memory at the shard's dtype


# ---- the sharded index ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Answer:
    scores: object           # float32 (B, k), the kind of array the queries were
    ids: object              # int64 (B, k) global ids, -1 padded
    epoch: int               # the corpus epoch every shard answered at


class ShardedIndex:
    """An item corpus split over Ray actors by contiguous global-id ranges; `topk` equals the kernel's
    `topk` over the whole corpus. Make one with `from_array` or `from_bundle` (after `ray.init`).

    Writes (`add`, `remove`) go through one ShardedIndex (the writer); copies of it sent to other
    processes (Ray Serve replicas) may search. Placement: `actor_options` (Ray actor options for every
    shard, e.g. {"num_cpus": 8}) and `placement` (per shard, e.g. a NodeAffinitySchedulingStrategy)."""

    def __init__(self, sources, bounds, metric, dim, dtype, *, threads=None, actor_options=None, placement=None,
                 respawn=True, retries=RETRIES):
        ray = _ray()
        if not ray.is_initialized():
            raise RuntimeError("start or join a Ray cluster first: ray.init() (or ray.init(address='auto'))")
        self.bounds = [int(b) for b in bounds]
        self.metric = metric
        self.dim = int(dim)
        self.dtype = dtype
        self.respawn = bool(respawn)
        self.retries = int(retries)
        self._sources = list(sources)
        self._threads = threads
        self._options = dict(actor_options or {})
        self._placement = list(placement) if placement is not None else [None] * len(self._sources)
        if len(self._placement) != len(self._sources):
            raise ValueError(f"placement must have one entry per shard ({len(self._sources)}), got {len(self._placement)}")
        self._log = [[] for _ in self._sources]          # per shard: the writes it applied, for a re-created actor
        self._epoch = 0
        self._id_limit = self.bounds[-1]                 # 1 + the largest id ever held
        self._write_lock = threading.Lock()
        self._respawn_lock = threading.Lock()
        self.shards = [self._start(s) for s in range(len(self._sources))]
        try:
            ray.get([h.ping.remote() for h in self.shards])
        except ray.exceptions.RayActorError as error:   # a bad source, a bundle missing on that machine
            self.close()
            raise ShardUnavailable(f"a shard could not start: {error}") from None

    # ---- making one

    @classmethod
    def from_array(cls, corpus, num_shards=4, *, metric="ip", bounds=None, **options):
        """Shards of an in-memory corpus: a float (N, d) array (float32/float16; CPU tensors also
        bfloat16) or a `quantize_rows` result. Each shard's rows go once into Ray's object store,
        which the shard's actor maps read-only (zero copy on the same machine)."""
        ray = _ray()
        check_choice("metric", metric, METRICS)
        if isinstance(corpus, RowTable):
            table = corpus.numpy()
        else:
            check_array("corpus", corpus, 2, ("float32", "float16", "bfloat16"))
            table = as_row_table(corpus, "corpus").numpy()
        n, dim = table.shape
        bounds = _bounds(n, num_shards, bounds)
        sources = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = [None if a is None else ray.put(np.ascontiguousarray(a[lo:hi])) for a in
                    (table.data, table.scale, table.bias)]
            sources.append(("rows", table.dtype, (hi - lo, dim), *part))
        return cls(sources, bounds, metric, dim, table.dtype, **options)

    @classmethod
    def from_bundle(cls, path, num_shards=4, *, array=DEFAULT_ARRAY, metric="ip", dtype="fp32", bounds=None,
                    verify=True, **options):
        """Shards of a bundle's array (default: the PureSVD item vectors, the engine's retrieval corpus):
        each actor memory-maps its own rows of the file, on the machine it runs on (the bundle must be
        at `path` there: a shared disk, or a copy per machine). verify: each actor checks the file's
        sha256 against the manifest first. dtype other than "fp32": the shard quantizes its rows."""
        from .bundle import MANIFEST
        import json
        check_choice("metric", metric, METRICS)
        check_choice("dtype", dtype, ROW_DTYPES)
        path = Path(path).resolve()
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            shape = manifest["files"][array[0]]["arrays"][array[1]]["shape"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: not a recscore bundle with an array {array[1]!r} in {array[0]}") from None
        if len(shape) != 2:
            raise ValueError(f"{path / array[0]}: array {array[1]!r} must be 2-D, got shape {shape}")
        n, dim = shape
        bounds = _bounds(n, num_shards, bounds)
        sources = [("bundle", str(path), array[0], array[1], lo, hi, dtype, bool(verify))
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        return cls(sources, bounds, metric, dim, dtype, **options)

    def _start(self, s):
        ray = _ray()
        options = dict(self._options)
        if self._placement[s] is not None:
            options["scheduling_strategy"] = self._placement[s]
        if self._threads is not None:
            env = {"NUMBA_NUM_THREADS": str(int(self._threads)), "OMP_NUM_THREADS": str(int(self._threads))}
            options["runtime_env"] = {**options.get("runtime_env", {}), "env_vars": env}
        actor = _shard_actor().options(**options) if options else _shard_actor()
        return actor.remote(self._sources[s], self.bounds[s], self.metric, self._threads)

    # ---- reads

    @property
    def num_shards(self):
        return len(self.shards)

    @property
    def epoch(self):
        return self._epoch

    def info(self):
        """One dict per shard: id range, rows, added rows, epoch, bytes, process id."""
        return self._wait([(s, h.info.remote()) for s, h in enumerate(self.shards)], "info")

    def __len__(self):
        return sum(i["rows"] for i in self.info())

    def topk(self, queries, k, *, metric=None, exclude=None):
        """(scores float32 (B, k), ids int64 (B, k)): equal to recscore.kernels.topk over the corpus
        (with the live writes applied), same errors for bad input. metric: default the index's."""
        answer = self.search(queries, k, metric=metric, exclude=exclude)
        return answer.scores, answer.ids

    def search(self, queries, k, *, metric=None, exclude=None):
        """`topk` as an Answer(scores, ids, epoch)."""
        return self.search_async(queries, k, metric=metric, exclude=exclude).result()

    def search_async(self, queries, k, *, metric=None, exclude=None):
        """Send the query to every shard now; `.result()` of the returned object waits for the Answer."""
        ray = _ray()
        metric = self.metric if metric is None else metric
        check_choice("metric", metric, METRICS)
        kind = check_array("queries", queries, 2, FLOAT_DTYPES)
        if kind == "cuda":
            raise ValueError("the shards serve from host memory: pass NumPy arrays or CPU tensors as queries")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have d = {queries.shape[1]} but corpus rows have d = {self.dim}")
        k = check_k(k)
        check_result_size(k, queries.shape[0], self._id_limit)   # no (B, huge k) result allocated on the shards
        check_finite("queries", queries)
        exclude = check_exclude(exclude, queries.shape[0], self._id_limit)
        host = to_numpy_float32(queries)
        parts = split_exclusions(*(exclude if exclude is not None else (None, None)), self.bounds)
        ref = ray.put(host) if host.nbytes > INLINE_BYTES else host   # small queries travel inside the task
        return _PendingSearch(self, ref, host.shape[0], k, parts, kind, metric)

    def _ask(self, ref, k, parts, metric):
        return [(s, h.search.remote(ref, k, parts[s], metric)) for s, h in enumerate(self.shards)]

    # ---- writes

    def add(self, ids, vectors):
        """Add items (int ids >= 0, float (n, d) vectors; an existing id is replaced), each on the shard
        that owns its id (ids past the initial corpus: the last shard). Returns the new epoch."""
        check_array("ids", ids, 1, ("int32", "int64"))
        check_array("vectors", vectors, 2, FLOAT_DTYPES)
        ids = np.asarray(ids, np.int64)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors must have shape ({len(ids)}, {self.dim}), got {tuple(vectors.shape)}")
        check_finite("vectors", vectors)
        if len(ids) and ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in results), got {int(ids.min())}")
        vectors = to_numpy_float32(vectors)
        _, last = np.unique(ids[::-1], return_index=True)      # a repeated id keeps its last vector
        keep = np.sort(len(ids) - 1 - last)
        ids, vectors = ids[keep], vectors[keep]
        owner = self._owner(ids)
        ops = [("add", ids[owner == s], vectors[owner == s]) if (owner == s).any() else None
               for s in range(self.num_shards)]
        self._write(ops)
        if len(ids):
            self._id_limit = max(self._id_limit, int(ids.max()) + 1)
        return self._epoch

    def remove(self, ids):
        """Stop serving these ids (unknown ids are ignored); returns how many were removed."""
        check_array("ids", ids, 1, ("int32", "int64"))
        ids = np.unique(np.asarray(ids, np.int64))
        owner = self._owner(ids)
        ops = [("remove", ids[owner == s], None) if (owner == s).any() else None for s in range(self.num_shards)]
        return sum(self._write(ops))

    def _owner(self, ids):
        return np.searchsorted(np.asarray(self.bounds[1:-1], np.int64), ids, side="right")

    def _write(self, ops):
        with self._write_lock:
            epoch = self._epoch + 1
            for s, op in enumerate(ops):
                self._log[s].append((epoch, op))
            calls = [(s, h.apply.remote(epoch, *(ops[s] or (None, None, None)))) for s, h in enumerate(self.shards)]
            removed = self._wait(calls, "write")
            self._epoch = epoch
            return removed

    # ---- failures

    def _wait(self, calls, what):
        """ray.get of each shard's call. A dead shard is re-created with its writes replayed (a write then
        counts as done: the replay applied it), or ShardUnavailable; a query gets None for it and asks again."""
        ray = _ray()
        dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        try:
            return ray.get([ref for _, ref in calls])     # the common case: one wait for all
        except dead:
            pass
        out = []
        for s, ref in calls:
            try:
                out.append(ray.get(ref))
            except dead as error:
                if not self.respawn:
                    raise ShardUnavailable(f"shard {s} (ids {self._range(s)}) is gone during the {what} ({_first_line(error)}); "
                                           f"nothing was answered") from None
                last = self._respawn(s)
                out.append(last if what == "write" else None)
        return out

    def _respawn(self, s):
        """Re-create shard s from its source and replay its writes; returns the last write's result."""
        ray = _ray()
        dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        with self._respawn_lock:
            try:   # another thread may have re-created it already
                ray.get(self.shards[s].ping.remote(), timeout=30)
                return 0
            except dead + (ray.exceptions.GetTimeoutError,):
                pass
            handle = self._start(s)
            last = 0
            try:
                for epoch, op in self._log[s]:
                    last = ray.get(handle.apply.remote(epoch, *(op or (None, None, None)), replay=True))
            except dead as error:
                raise ShardUnavailable(f"shard {s} (ids {self._range(s)}) died and could not be re-created: "
                                       f"{_first_line(error)}") from None
            self.shards[s] = handle
            return last

    def _range(self, s):
        return f"{self.bounds[s]}..{self.bounds[s + 1] - 1}" if s < self.num_shards - 1 else f"{self.bounds[s]}.."

    def close(self):
        """End the shard actors."""
        ray = _ray()
        for h in self.shards:
            ray.kill(h)
        self.shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):   # a copy for another process (a Serve replica): it searches, it does not write
        state = self.__dict__.copy()
        state.pop("_write_lock")
        state.pop("_respawn_lock")
        state["respawn"] = False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._write_lock = threading.Lock()
        self._respawn_lock = threading.Lock()


class _PendingSearch:
    """A query sent to every shard; result() merges the answers (asking again on an epoch change or a
    re-created shard)."""

    def __init__(self, index, ref, B, k, parts, kind, metric):
        self.index, self.ref, self.B, self.k, self.parts, self.kind, self.metric = index, ref, B, k, parts, kind, metric
        self.calls = index._ask(ref, k, parts, metric)

    def result(self):
        index = self.index
        wait = RETRY_WAIT_S
        seen = []
        for attempt in range(index.retries + 1):
            answers = index._wait(self.calls, "query")
            if all(a is not None for a in answers):
                epochs = sorted({a[0] for a in answers})
                if len(epochs) == 1:
                    scores, ids = merge_topk([(a[1], a[2]) for a in answers], self.k, self.metric, self.B)
                    return Answer(like(scores, self.kind), like(ids, self.kind), epochs[0])
                seen.append(epochs)
                time.sleep(wait)
                wait *= 2
            self.calls = index._ask(self.ref, self.k, self.parts, self.metric)
        raise EpochMismatch(f"the shards answered at different corpus epochs {seen[-1] if seen else '?'} on each of "
                            f"{index.retries + 1} tries (a shard is out of step with the writer): no answer was "
                            f"merged")


_ACTOR = None


def _shard_actor():
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = _ray().remote(max_restarts=0, max_task_retries=0)(Shard)
    return _ACTOR


def _bounds(n, num_shards, bounds):
    if bounds is not None:
        bounds = [int(b) for b in bounds]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds must rise from 0 to the corpus size {n}, got {bounds}")
        return bounds
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)):
        raise TypeError(f"num_shards must be an integer, got {type(num_shards).__name__}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [n * s // num_shards for s in range(num_shards + 1)]


# ---- state all replicas share ------------------------------------------------------------------------

CHANGES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, origin TEXT NOT NULL,"
    " user INTEGER, item INTEGER, delta REAL NOT NULL)",
)


class SharedSQLiteState(SQLiteState):
    """The engine's SQLite store, shared by several engines (processes, Serve replicas) on one disk.

    Each write also appends to a change log in the same transaction: (user, item, +1) for an event; for
    forget_user a marker (user, NULL) and per item (NULL, item, -count), with the user's earlier
    entries unlinked from them. `changes()` returns the entries other engines wrote since the last call,
    in commit order. A server database replaces it by giving the same: durable appends, a log read in
    commit order from a cursor, and read-your-writes across clients (docs/distributed.md)."""

    def __init__(self, path, durability="process", **options):
        super().__init__(path, durability, **options)
        self.origin = uuid.uuid4().hex
        for statement in CHANGES_SCHEMA:
            self._db.execute(statement)
        self._cursor = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def append_many(self, events):
        rows = [(int(user), int(item), float(value), str(event), float(ts)) for user, item, value, event, ts in events]
        with self._transaction():
            self._db.executemany("INSERT INTO events (user, item, value, event, ts) VALUES (?, ?, ?, ?, ?)", rows)
            self._db.executemany("INSERT INTO changes (origin, user, item, delta) VALUES (?, ?, ?, 1)",
                                 [(self.origin, user, item) for user, item, *_ in rows])

    def item_counts(self):
        """Counts and the log's cursor from one read transaction: entries after it are not in the counts."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._cursor = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
                counts = dict(self._db.execute("SELECT item, COUNT(*) FROM events GROUP BY item"))
                self._forgotten = {row[0] for row in self._db.execute("SELECT user FROM forgotten")}
            finally:
                self._db.execute("COMMIT")
            return counts

    def forget_user(self, user):
        user = int(user)
        with self._transaction():
            counts = self._db.execute("SELECT item, COUNT(*) FROM events WHERE user = ? GROUP BY item",
                                      (user,)).fetchall()
            deleted = self._db.execute("DELETE FROM events WHERE user = ?", (user,)).rowcount
            self._db.execute("INSERT OR IGNORE INTO forgotten (user) VALUES (?)", (user,))
            self._db.execute("UPDATE changes SET user = NULL WHERE user = ?", (user,))
            self._db.execute("INSERT INTO changes (origin, user, item, delta) VALUES (?, ?, NULL, 0)",
                             (self.origin, user))
            self._db.executemany("INSERT INTO changes (origin, user, item, delta) VALUES (?, NULL, ?, ?)",
                                 [(self.origin, item, -float(count)) for item, count in counts])
        with self._lock:
            self._forgotten.add(user)
        return deleted

    def changes(self):
        """Entries other engines committed since the last call: a list of (user or None, item or None,
        popularity delta). Users another engine forgot are marked forgotten here too."""
        with self._lock:
            rows = self._db.execute("SELECT seq, origin, user, item, delta FROM changes WHERE seq > ? ORDER BY seq",
                                    (self._cursor,)).fetchall()
            if not rows:
                return []
            self._cursor = rows[-1][0]
            out = []
            for _, origin, user, item, delta in rows:
                if origin == self.origin:
                    continue
                if user is not None and item is None:
                    self._forgotten.add(int(user))
                out.append((user, item, delta))
            return out

    def prune(self, before_seq):
        """Delete log entries before `before_seq` (every engine must have read them); returns how many."""
        with self._lock:
            return self._db.execute("DELETE FROM changes WHERE seq < ?", (int(before_seq),)).rowcount


class SharedEngine(Engine):
    """An Engine over a SharedSQLiteState: before each request it applies what other engines wrote
    (their users' cached entries dropped, popularity moved), so all of them answer alike.
    Catalogue changes (add_items, remove_items) stay in the engine that made them: see docs/distributed.md."""

    @classmethod
    def open(cls, path, state=None, *, durability="process", **options):
        if state is None:
            state = SharedSQLiteState(Path(path) / STATE_FILE, durability=durability)
        if not isinstance(state, SharedSQLiteState):
            raise TypeError(f"state must be a SharedSQLiteState (a store replicas share), got {type(state).__name__}")
        return super().open(path, state, durability=durability, **options)

    def sync(self):
        """Apply the other engines' writes; returns how many log entries were applied."""
        changes = self.state.changes()
        if changes:
            with self._lock:
                row_of = self._catalogue.row_of
                for user, item, delta in changes:
                    if user is not None:
                        self._generation[user] += 1       # a load racing this one is not cached
                        self._users.pop(user, None)
                    if item is not None and delta:
                        row = row_of.get(item)
                        if row is not None:
                            self._popularity[row] += delta
        return len(changes)

    def recommend(self, user, k=10, **options):
        self.sync()
        return super().recommend(user, k, **options)

    def recommend_many(self, users, k=10, **options):
        self.sync()
        return super().recommend_many(users, k, **options)

    def score(self, user, items):
        self.sync()
        return super().score(user, items)

    def similar_items(self, item, k=10):
        self.sync()
        return super().similar_items(item, k)

    def explain_stream(self, user, item):
        self.sync()
        return super().explain_stream(user, item)

    def forget_user(self, user):
        self.sync()
        return super().forget_user(user)


# ---- Ray Serve -----------------------------------------------------------------------------------

def _frozen(filters):
    if not filters:
        return None
    if not isinstance(filters, dict):
        raise ValueError(f"filters must be a dict, got {type(filters).__name__}")
    return tuple(sorted((key, tuple(sorted(value or ()))) for key, value in filters.items()))


def _result(rec, replica):
    return {"items": [int(i) for i in rec.items], "scores": [float(s) for s in rec.scores], "source": rec.source,
            "replica": replica}


class EngineServer:
    """What one Serve replica runs (`build_app` makes the deployment): a SharedEngine, requests batched
    into `recommend_many`. Methods for DeploymentHandle callers: recommend, feedback, forget_user,
    replica; HTTP: GET /recommend?user=U&k=K, POST /feedback {"user", "item", "value"}."""

    def __init__(self, bundle, state=None, durability="process", **engine_options):
        state = SharedSQLiteState(Path(state) if state else Path(bundle) / STATE_FILE, durability=durability)
        self.engine = SharedEngine.open(bundle, state, **engine_options)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def replica(self):
        return self.name

    async def recommend(self, user, k=10, exclude_seen=True, filters=None):
        from .engine import _as_id, _count
        request = (_as_id("user", user), _count("k", k), bool(exclude_seen), _frozen(filters), filters)
        out = await self._batch(request)
        if isinstance(out, BaseException):
            raise out
        return out

    async def _recommend_batch(self, requests):
        """One recommend_many per distinct (k, exclude_seen, filters): a failure answers its group only."""
        groups = collections.defaultdict(list)
        for at, request in enumerate(requests):
            groups[request[1:4]].append(at)
        out = [None] * len(requests)
        loop = asyncio.get_running_loop()
        for (k, exclude_seen, _), ats in groups.items():
            users = [requests[at][0] for at in ats]
            filters = requests[ats[0]][4]
            try:
                recs = await loop.run_in_executor(None, lambda: self.engine.recommend_many(
                    users, k, exclude_seen=exclude_seen, filters=filters))
                for at, rec in zip(ats, recs):
                    out[at] = _result(rec, self.name)
            except Exception as error:
                for at in ats:
                    out[at] = error
        return out

    async def feedback(self, user, item, value=1.0, event="click"):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.engine.feedback(user, item, value, event))
        return {"ok": True, "replica": self.name}

    async def forget_user(self, user):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.engine.forget_user(user))
        return {"ok": True, "replica": self.name}

    async def __call__(self, request):
        from starlette.responses import JSONResponse
        from .engine import UnknownItem
        path = request.url.path.rstrip("/")
        try:
            if path.endswith("/recommend") and request.method == "GET":
                query = request.query_params
                return JSONResponse(await self.recommend(_int_field("user", query.get("user")),
                                                         _int_field("k", query.get("k", "10"))))
            if path.endswith("/feedback") and request.method == "POST":
                try:
                    body = await request.json()
                except ValueError:
                    raise ValueError("the body must be JSON: {\"user\": U, \"item\": I, \"value\": V}") from None
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object with user, item and value")
                return JSONResponse(await self.feedback(_int_field("user", body.get("user")),
                                                        _int_field("item", body.get("item")),
                                                        float(body.get("value", 1.0)), str(body.get("event", "click"))))
        except UnknownItem as error:
            return JSONResponse({"error": error.args[0] if error.args else str(error)}, status_code=404)
        except (TypeError, ValueError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse({"error": "GET /recommend?user=U&k=K or POST /feedback"}, status_code=404)


def _int_field(name, value):
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


class RetrievalServer:
    """The retrieval stage alone as a Serve deployment (`retrieval_deployment`): replicas that batch
    single-query requests into one search over a ShardedIndex's shard actors (one writer elsewhere)."""

    def __init__(self, index):
        if not isinstance(index, ShardedIndex):
            raise TypeError(f"index must be a ShardedIndex, got {type(index).__name__}")
        self.index = index

    async def topk(self, query, k=10, exclude=(), metric=None):
        """(scores, ids, epoch) of one query vector (d,), never returning the ids in `exclude`."""
        query = np.asarray(query, np.float32)
        if query.shape != (self.index.dim,):
            raise ValueError(f"query must be a vector of {self.index.dim} values, got shape {query.shape}")
        exclude = np.asarray(exclude, np.int64).reshape(-1)
        out = await self._batch((query, check_k(k), metric or self.index.metric, exclude))
        if isinstance(out, BaseException):
            raise out
        return out

    async def _search_batch(self, requests):
        """One ShardedIndex.search per distinct (k, metric); a failure answers its group only."""
        groups = collections.defaultdict(list)
        for at, (_, k, metric, _) in enumerate(requests):
            groups[(k, metric)].append(at)
        out = [None] * len(requests)
        loop = asyncio.get_running_loop()
        for (k, metric), ats in groups.items():
            queries = np.stack([requests[at][0] for at in ats])
            excluded = [requests[at][3] for at in ats]
            indptr = np.zeros(len(ats) + 1, np.int64)
            np.cumsum([len(e) for e in excluded], out=indptr[1:])
            exclude = (indptr, np.concatenate(excluded)) if indptr[-1] else None
            try:
                answer = await loop.run_in_executor(None, lambda: self.index.search(queries, k, metric=metric,
                                                                                     exclude=exclude))
                for j, at in enumerate(ats):
                    out[at] = (answer.scores[j], answer.ids[j], answer.epoch)
            except Exception as error:
                for at in ats:
                    out[at] = error
        return out


def retrieval_deployment(replicas=2, max_batch=BATCH_SIZE, batch_wait_s=BATCH_WAIT_S, ray_actor_options=None):
    """The Serve deployment of RetrievalServer; bind it to a ShardedIndex: `.bind(index)`."""
    _ray()
    from ray import serve

    class RecscoreRetrieval(RetrievalServer):
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def _batch(self, requests):
            return await self._search_batch(requests)

    return serve.deployment(RecscoreRetrieval, name="recscore-retrieval", num_replicas=int(replicas),
                            ray_actor_options=ray_actor_options or {"num_cpus": 0})


def engine_deployment(replicas=2, max_batch=BATCH_SIZE, batch_wait_s=BATCH_WAIT_S, ray_actor_options=None):
    """The Serve deployment of EngineServer: `replicas` copies, `@serve.batch` of up to max_batch."""
    _ray()
    from ray import serve

    class RecscoreEngine(EngineServer):
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def _batch(self, requests):
            return await self._recommend_batch(requests)

    return serve.deployment(RecscoreEngine, name="recscore", num_replicas=int(replicas),
                            ray_actor_options=ray_actor_options or {"num_cpus": 1})


def build_app(args):
    """`serve run recscore.distributed:build_app bundle=PATH [state=DB] [replicas=2] [max_batch=64]
    [batch_wait_ms=2] [num_cpus=1]`: the engine application (args as strings, from the command line or
    a Serve config file's `args`)."""
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("build_app needs bundle=PATH (a recscore bundle every node can read)")
    deployment = engine_deployment(int(args.get("replicas", 2)), int(args.get("max_batch", BATCH_SIZE)),
                                   float(args.get("batch_wait_ms", BATCH_WAIT_S * 1e3)) / 1e3,
                                   {"num_cpus": float(args.get("num_cpus", 1))})
    return deployment.bind(str(Path(args["bundle"]).resolve()), args.get("state"),
                           args.get("durability", "process"))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
