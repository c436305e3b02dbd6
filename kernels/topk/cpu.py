"""Fused similarity top-k on the CPU: score corpus tiles and keep a running top-k per query.

The scan, the selection and the merge of the threads' candidates are C (bindings/_topk_scan.h,
vector kernels in bindings/_topk_scan_simd.h, compiled for every CPU level and run at
`cpu_level()`); this file prepares its buffers and picks the thread count.

Every candidate is one int64 key, `(order(score) << 32) | (0xFFFFFFFF - id)`: comparing
keys compares scores, then prefers the smaller id, so the exact tie rule costs nothing.
"l2" is scored negated so that larger is always better. Each query keeps a buffer of
keys above a threshold (the k-th best key so far); when the buffer fills, a quickselect
keeps the best k and raises the threshold, so almost every score costs one compare.
No (B, N) score matrix is ever held. Threads take chunks of corpus tiles (about 64 KB of
float32 rows) in turn, each keeping one top-k per query over its chunks; the same OpenMP
region then merges them. Exclusions go to the scan as the CSR they come in (sorted by tile
in C, a bitmap per tile). From 5 queries (11 on int8 rows) the scan runs register blocks of rows x
query panels; fewer queries run one query against a group of rows at a time, int8 rows there on
their codes with an exact integer bound as a pre-selection. Measurements: bench/notes/cpu-topk.md.
"""
import numpy as np

from .._backend import warn_once
from .._cpu import cpu_level, kernel_threads
from ...bindings import _topk_scan
from ...bindings._cpu import DTYPE_CODES, METRIC_CODES

# Scans of fewer corpus bytes + multiply-adds run on the calling thread: waking and joining a
# sleeping OpenMP thread costs 60-120 us here (bench/notes/cpu-topk.md).
SERIAL_SCAN_BELOW = 8 << 20
# int8 rows with fewer than 11 queries: skip the groups whose exact integer bound misses the
# threshold (False scores every group in float: the tests' reference for the bound).
INT8_BOUND = True

_NO_EXCLUSIONS = np.zeros(0, np.int64)
_NO_QPARAMS = np.zeros(0, np.float32)


def topk(queries, corpus, k, metric, exclude):
    """queries float32 (B, d); corpus a RowTable; exclude None or host int64 (indptr, ids)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    corpus = corpus.numpy()
    B, dim = queries.shape
    n_rows = corpus.shape[0]
    scores = np.empty((B, k), np.float32)
    ids = np.empty((B, k), np.int64)
    if B == 0:
        return scores, ids
    excl_ptr, excl_ids = (_NO_EXCLUSIONS, _NO_EXCLUSIONS) if exclude is None else exclude
    serial = corpus.data.nbytes + n_rows * dim * B < SERIAL_SCAN_BELOW
    threads = 1 if serial else kernel_threads()
    if not corpus.data.flags.c_contiguous:
        warn_once("topk-corpus-copy", "topk: the corpus rows are not contiguous (a column slice, "
                                      "RowTable.fused()); the scan copies them on every call")
    rows = np.ascontiguousarray(corpus.data)
    rows = rows.view(np.uint16) if corpus.dtype in ("fp16", "bf16") else rows
    scale = _NO_QPARAMS if corpus.scale is None else np.ascontiguousarray(corpus.scale, dtype=np.float32)
    bias = _NO_QPARAMS if corpus.bias is None else np.ascontiguousarray(corpus.bias, dtype=np.float32)
    _topk_scan.scan(cpu_level(), DTYPE_CODES[corpus.dtype], rows, scale, bias, queries, METRIC_CODES[metric], k,
                    excl_ptr, excl_ids, threads, INT8_BOUND, scores, ids)
    return scores, ids
