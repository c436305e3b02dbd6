"""Fused similarity top-k on the CPU: score corpus tiles and keep a running top-k per query.

The scan is C (bindings/_topk_scan.h); this file validates its buffers and merges the
threads' candidates (Numba).

Every candidate is one int64 key, `(order(score) << 32) | (0xFFFFFFFF - id)`: comparing
keys compares scores, then prefers the smaller id, so the exact tie rule costs nothing.
"l2" is scored negated so that larger is always better. Each query keeps a buffer of
keys above a threshold (the k-th best key so far); when the buffer fills, a quickselect
keeps the best k and raises the threshold, so almost every score costs one compare.
No (B, N) score matrix is ever held. Threads take chunks of corpus tiles (about 64 KB of
float32 rows) in turn and each keeps one top-k per query over its chunks; `_merge` combines
the threads' candidates. Exclusions go to the scan as the CSR they come in: its threads sort
each query's ids by tile (in C, no division), and mask each tile's survivors with a bitmap.

B >= 8: queries in panels of 16; an AVX-512 outer-product block of 6 rows x 4 panels (24 zmm
accumulators) whose score vectors (one row x 16 queries) meet the selection as one compare
with those queries' thresholds. It runs at about 80 GFLOP/s a core at d = 64, k = 100 (100
at d = 384), where the Numba 2x4 dot loops it replaces ran at 33-44 (LLVM kept no
outer-product block in registers for any loop form tried): N = 1M, B = 256 went from
0.8 s to about 0.2 s on two threads. B < 8: one query against 16 rows at a time, each row
read in order into its own accumulator, the 16 reduced together; at B = 1 it beat the Numba
row-pair loops (d = 64: 15 vs 22 ms; d = 384, 500k rows: 44 vs 122 ms; two threads, busy
machine). There int8 rows are scored on their codes where they lie,
`scale * (codes . q) + bias * sum(q)` (5.3 ns a row on one core at d = 64; widening the tile
first took twice the time); with AVX-512 VNNI an int16-quantized query gives exact integer dots
and a proven bound on the float score first, and only groups of 16 rows where a bound reaches
the threshold are scored in float (d = 64: 3.0 ns a row on one core, its 16 rows a column step at a time with
the sums in registers and the next groups prefetched, where row by row took 4.9; d = 384: 17
ns row by row, instead of 29.3 without VNNI). Otherwise fp16/bf16 tiles are widened and int8/int4 tiles
dequantized (code * scale + bias, the reference's rounding) into a per-thread float32 tile
buffer, never the whole corpus: at B = 16 that is 2x the Numba code loops it replaces.
Without AVX-512 the panel algorithm runs as portable C, with a warning.
"""
import numba
import numpy as np
from numba import njit, prange

from .._backend import warn_once
from ...bindings import _topk_scan
from .. import _numba  # noqa: F401  (thread-safe threading layer before any parallel kernel)

DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int4": 4}   # TKS_FP32 ... in _topk_scan.h
METRIC_CODES = {"ip": 0, "cosine": 1, "l2": 2}
PORTABLE, AVX512, AVX512_VNNI = 0, 1, 2   # the scan's ISA levels (TKS_PORTABLE ... in _topk_scan.h)
BEST_ISA = _topk_scan.best_isa()

TILE_BYTES = 1 << 16     # float32 rows a tile: re-read from L2 by every block of query panels
ROWS_PER_BLOCK = 6       # TKS_MR: tiles hold whole register blocks of rows
CHUNKS_PER_THREAD = 8    # chunks of tiles a thread: a core slowed by other work takes fewer
SERIAL_MERGE_BELOW = 64  # smaller batches merge on one thread (a parallel region costs more)
# Scans of fewer corpus bytes + multiply-adds run on the calling thread: waking and joining a
# sleeping OpenMP thread costs 60-120 us here. Measured d=64 B=1, one thread against two:
# N=2k 39 vs 105 us, N=10k 117 vs 185 us; two threads win from N=10k B=16 (12.8M) and N=50k B=1.
SERIAL_SCAN_BELOW = 8 << 20
LOW32 = 0xFFFFFFFF


@njit(inline="always")
def _order(bits):
    """int32 bits of a float32 -> an int32 that orders like the float (for non-NaN)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@njit(nogil=True, cache=True)
def _keep_best(keys, n, k):
    """Quickselect: move the k largest of keys[:n] to keys[:k] (keys are distinct).

    Branch-free Lomuto partitions (a swap each step), as tks_keep_best in _topk_scan.h.
    """
    lo, hi = 0, n - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        a, b, c = keys[lo], keys[mid], keys[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        at = hi if c == pivot else (mid if b == pivot else lo)
        keys[at] = keys[hi]
        keys[hi] = pivot
        store = lo
        for i in range(lo, hi):
            v = keys[i]
            keys[i] = keys[store]
            keys[store] = v
            store += v > pivot
        keys[hi] = keys[store]
        keys[store] = pivot
        if store == k - 1 or store == k:
            break
        if store > k:
            hi = store - 1
        else:
            lo = store + 1


def _merge_impl(keys, counts, k, negate, scores_out, ids_out):
    """Per query: the best k of all threads' candidates, best first, decoded; -1/-inf padding."""
    n_parts, B, cap = keys.shape
    for q in prange(B):
        total = 0
        for c in range(n_parts):
            total += counts[c, q]
        pool = np.empty(total, np.int64)
        at = 0
        for c in range(n_parts):
            pool[at:at + counts[c, q]] = keys[c, q, :counts[c, q]]
            at += counts[c, q]
        m = min(k, total)
        if total > k:
            _keep_best(pool, total, k)
        best = np.sort(pool[:m])[::-1]
        bits = np.empty(m, np.int32)
        for t in range(m):
            bits[t] = _order(np.int32(best[t] >> 32))
            ids_out[q, t] = LOW32 - (best[t] & LOW32)
        values = bits.view(np.float32)
        for t in range(m):
            scores_out[q, t] = np.float32(0) - values[t] if negate else values[t]
        for t in range(m, k):
            scores_out[q, t] = np.inf if negate else -np.inf
            ids_out[q, t] = -1


_merge_parallel = njit(parallel=True, nogil=True, cache=True)(_merge_impl)
_merge_serial = njit(nogil=True, cache=True)(_merge_impl)


def topk(queries, corpus, k, metric, exclude, *, isa=BEST_ISA):
    """queries float32 (B, d); corpus a RowTable; exclude None or host int64 (indptr, ids).

    isa: the scan's code (default: the best this CPU runs); tests run the lower levels too.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    corpus = corpus.numpy()
    B, dim = queries.shape
    n_rows = corpus.shape[0]
    scores_out = np.empty((B, k), np.float32)
    ids_out = np.empty((B, k), np.int64)
    if B == 0:
        return scores_out, ids_out
    if BEST_ISA == PORTABLE:
        warn_once("topk-avx512", "topk: this CPU has no AVX-512; the scan runs as portable C (slower)")
    tile_rows = max(ROWS_PER_BLOCK, TILE_BYTES // (4 * max(dim, 1)) // ROWS_PER_BLOCK * ROWS_PER_BLOCK)
    n_tiles = (n_rows + tile_rows - 1) // tile_rows
    no_exclusions = np.zeros(0, np.int64)
    excl_ptr, excl_ids = (no_exclusions, no_exclusions) if exclude is None else exclude
    serial = corpus.data.nbytes + n_rows * dim * B < SERIAL_SCAN_BELOW
    threads = 1 if serial else numba.get_num_threads()
    n_chunks = max(1, min(n_tiles, CHUNKS_PER_THREAD * threads))
    cap = 2 * k + 16
    keys = np.empty((threads, B, cap), np.int64)
    counts = np.zeros((threads, B), np.int64)
    bad = np.zeros(threads, np.bool_)
    if not corpus.data.flags.c_contiguous:
        warn_once("topk-corpus-copy", "topk: the corpus rows are not contiguous (a column slice, "
                                      "RowTable.fused()); the scan copies them on every call")
    rows = np.ascontiguousarray(corpus.data)
    rows = rows.view(np.uint16) if corpus.dtype in ("fp16", "bf16") else rows
    no_qparams = np.zeros(0, np.float32)
    scale = no_qparams if corpus.scale is None else np.ascontiguousarray(corpus.scale, dtype=np.float32)
    bias = no_qparams if corpus.bias is None else np.ascontiguousarray(corpus.bias, dtype=np.float32)
    _topk_scan.scan(isa, DTYPE_CODES[corpus.dtype], rows, scale, bias, queries, METRIC_CODES[metric], k,
                    tile_rows, excl_ptr, excl_ids, n_chunks, keys, counts, bad.view(np.uint8), threads)
    if bad.any():
        raise ValueError("corpus contains NaN or inf (a score came out non-finite)")
    merge = _merge_serial if serial or B < SERIAL_MERGE_BELOW else _merge_parallel
    merge(keys, counts, k, metric == "l2", scores_out, ids_out)
    return scores_out, ids_out
