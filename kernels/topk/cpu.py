"""Fused similarity top-k on the CPU (Numba): score corpus tiles and keep a running top-k.

Every candidate is one int64 key, `(order(score) << 32) | (0xFFFFFFFF - id)`: comparing
keys compares scores, then prefers the smaller id, so the exact tie rule costs nothing.
"l2" is scored negated so that larger is always better. Each query keeps a buffer of
keys above a threshold (the k-th best key so far); when the buffer fills, a quickselect
keeps the best k and raises the threshold, so almost every score costs one compare.

The scan (`_scan`) never holds a (B, N) score matrix. The corpus is split into chunks run
in parallel (two per thread, so one query uses every core); a chunk walks its tiles of
about 128 KB of rows, and each tile, read from memory once, is scored against every
query block while it sits in L2. A block's scores are computed 2 rows x 4 queries at a
time (8 independent accumulators sharing the loads of rows and queries), then each
query's row of tile scores goes through the selection while it is in cache; `_merge`
then combines the chunks' candidates. int8 rows are scored on their codes
(`scale * (codes . q) + bias * sum(q)`), never dequantized: for fewer than 4 queries each
query scores the tile one row at a time where the codes lie (widened inside the dot loop,
unsigned indices: no per-element wraparound check; 1.25x over the row-pair loops), else
the codes are widened once per row pair; fp16/bf16/int4 rows are widened a row pair at a
time. "l2" and "cosine" use |x|^2 and |q|^2 beside the dot.
The 2x4 loops run at about 40 GFLOP/s a core (d = 64): every score ends in a 16-lane
horizontal sum, and LLVM keeps no outer-product block (queries x rows) in registers for
any loop form tried (rank-1 updates, 4x16 scalar accumulators: 5-12 GFLOP/s), nor does
4x4 beat 2x4. OpenBLAS sgemm on one thread does 45 GFLOP/s on a 32 x 512 x 64 tile (so
per tile it is no win) and 78 on 256 x 512 x 64; calling it from the workers needs a
private symbol (no SciPy for Numba's np.dot), so large batches stay compute-bound here.

Exclusions are bucketed by corpus tile once per call, then set to -inf in each tile's
scores before selection; -inf is below every key the threshold lets in.
"""
import numba
import numpy as np
from numba import njit, prange

from .. import _numba  # noqa: F401  (thread-safe threading layer before any parallel kernel)

FP32, FP16, BF16, INT8, INT4 = 0, 1, 2, 3, 4
DTYPE_CODES = {"fp32": FP32, "fp16": FP16, "bf16": BF16, "int8": INT8, "int4": INT4}
IP, COSINE, L2 = 0, 1, 2
METRIC_CODES = {"ip": IP, "cosine": COSINE, "l2": L2}

TILE_BYTES = 1 << 17  # a tile of rows scored before selection: read from memory once per call
QUERY_BLOCK = 32      # queries scored together against a tile: (block x tile) scores stay in L1/L2
SERIAL_MERGE_BELOW = 64  # smaller batches merge on one thread (a parallel region costs more)

# Must not be jitted with nnan/ninf: the NaN/inf check relies on them.
FASTMATH = {"reassoc", "contract"}
LOW32 = 0xFFFFFFFF
# The key of score -inf with id 0: finite scores are above it, excluded (-inf) ones are not.
FLOOR_KEY = ((-2139095041) << 32) | LOW32


@njit(inline="always")
def _order(bits):
    """int32 bits of a float32 -> an int32 that orders like the float (for non-NaN)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@njit(nogil=True, cache=True)
def _keep_best(keys, n, k):
    """Quickselect: move the k largest of keys[:n] to keys[:k] (keys are distinct)."""
    lo, hi = 0, n - 1
    target = k - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        a, b, c = keys[lo], keys[mid], keys[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break


@njit(inline="always")
def _admit(bits, n, row0, keys, count, thr, k):
    """Offer the scores (as int32 bits) of rows row0 .. row0+n to one query's buffer; returns (count, thr).

    Blocks of 16 whose best score is below the threshold are skipped after one vector max.
    """
    cap = keys.shape[0]
    thr_bits = np.int32(thr >> 32)
    for j0 in range(0, n, 16):
        j1 = min(n, j0 + 16)
        block_best = np.int32(-2147483648)
        for j in range(j0, j1):
            block_best = max(block_best, _order(bits[j]))
        if block_best < thr_bits:
            continue
        for j in range(j0, j1):
            if _order(bits[j]) >= thr_bits:  # cheap pre-check on the score alone
                key = (np.int64(_order(bits[j])) << 32) | (LOW32 - (row0 + j))
                if key > thr:
                    keys[count] = key
                    count += 1
                    if count == cap:
                        _keep_best(keys, count, k)
                        count = k
                        thr = keys[0]
                        for t in range(1, k):
                            thr = min(thr, keys[t])
                        thr_bits = np.int32(thr >> 32)
    return count, thr


@njit(inline="always")
def _exclude(scores, q, tile, row0, bucket_ptr, bucket_ids):
    """Set the scores of query q's excluded rows in this tile to -inf."""
    if bucket_ptr.shape[0] == 0:
        return
    for p in range(bucket_ptr[q, tile], bucket_ptr[q, tile + 1]):
        scores[bucket_ids[p] - row0] = -np.inf


@njit(inline="always")
def _load_row(kind, r, u16, u8, dim, rows, rows_bits, slot):
    """Row r of a non-fp32 corpus as float32 into rows[slot]: the values, or the codes for int8/int4."""
    if kind == INT8:
        for c in range(dim):
            rows[slot, c] = np.float32(u8[r, c])
    elif kind == INT4:
        for c in range(dim):
            rows[slot, c] = np.float32((u8[r, c >> 1] >> ((c & 1) * 4)) & 15)
    elif kind == BF16:
        for c in range(dim):
            rows_bits[slot, c] = np.uint32(u16[r, c]) << 16
    else:  # fp16 bits -> float32 bits; subnormal halves (exponent 0) are m * 2**-24
        for c in range(dim):
            h = np.uint32(u16[r, c])
            magnitude = ((h & 0x7FFF) << 13) + (112 << 23)
            if (h & 0x7C00) == 0x7C00:
                magnitude += 112 << 23  # inf/nan: exponent all ones
            rows_bits[slot, c] = ((h & 0x8000) << 16) | magnitude
        for c in range(dim):
            h = np.uint32(u16[r, c])
            if (h & 0x7C00) == 0:
                sub = np.float32(h & 0x3FF) * np.float32(5.960464477539063e-08)
                rows[slot, c] = -sub if h & 0x8000 else sub


@njit(inline="always")
def _row_sq(values, at, dim, s, b):
    """|x|^2 of a corpus row whose values are values[at]; x = values * s + b (s=1, b=0 for floats).

    Summed term by term: the expansion s^2 sum(c^2) + 2sb sum(c) + d b^2 cancels badly.
    """
    squares = np.float32(0)
    for c in range(dim):
        x = np.float32(values[at, c]) * s + b
        squares += x * x
    return squares


@njit(inline="always")
def _dots_2x4(values, a, b, queries, q, dim, dots, i, j):
    """dots[i:i+4, j:j+2] = queries[q:q+4] . (values[a], values[b]): 8 independent sums."""
    a0, a1, a2, a3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
    b0, b1, b2, b3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
    for c in range(dim):
        x, y = values[a, c], values[b, c]
        u0, u1, u2, u3 = queries[q, c], queries[q + 1, c], queries[q + 2, c], queries[q + 3, c]
        a0 += x * u0
        a1 += x * u1
        a2 += x * u2
        a3 += x * u3
        b0 += y * u0
        b1 += y * u1
        b2 += y * u2
        b3 += y * u3
    dots[i, j], dots[i + 1, j], dots[i + 2, j], dots[i + 3, j] = a0, a1, a2, a3
    dots[i, j + 1], dots[i + 1, j + 1], dots[i + 2, j + 1], dots[i + 3, j + 1] = b0, b1, b2, b3


@njit(inline="always")
def _dots_2x1(values, a, b, queries, q, dim, dots, i, j):
    """dots[i, j:j+2] = queries[q] . (values[a], values[b])."""
    a0, b0 = np.float32(0), np.float32(0)
    for c in range(dim):
        a0 += np.float32(values[a, c]) * queries[q, c]
        b0 += np.float32(values[b, c]) * queries[q, c]
    dots[i, j], dots[i, j + 1] = a0, b0


@njit(inline="always")
def _dots_1(values, row0, n, queries, q, dim, out):
    """out[j] = queries[q] . values[row0 + j] for j < n: one row at a time (uint8 codes widened in the loop)."""
    for j in range(n):
        r = np.uint64(row0 + j)  # unsigned indices: no negative-index wraparound in the inner loop
        acc = np.float32(0)
        for c in range(np.uint64(dim)):
            acc += np.float32(values[r, c]) * queries[q, c]
        out[j] = acc


@njit(inline="always")
def _dots_rows(values, a, b, queries, q0, nq, dim, dots, j):
    """dots[:nq, j:j+2] for queries q0 .. q0+nq against rows values[a], values[b]."""
    i = 0
    while i + 4 <= nq:
        _dots_2x4(values, a, b, queries, q0 + i, dim, dots, i, j)
        i += 4
    while i < nq:
        _dots_2x1(values, a, b, queries, q0 + i, dim, dots, i, j)
        i += 1


@njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _scan(queries, kind, f32, u16, u8, scale, bias, metric, k, n_rows, tile_rows, qblock, n_chunks,
          bucket_ptr, bucket_ids, keys_out, counts_out, bad_out):
    """Chunk w of the corpus against every query; tile by tile, query block by query block,
    so a tile is read from memory once for the whole batch.

    Fills keys_out (n_chunks, B, cap) / counts_out (n_chunks, B) with each chunk's
    candidates; bad_out[w] is set when a score came out NaN or inf.
    """
    B, dim = queries.shape
    n_tiles = (n_rows + tile_rows - 1) // tile_rows
    tiles_per_chunk = (n_tiles + n_chunks - 1) // n_chunks
    quantized = kind == INT8 or kind == INT4
    needs_row_sq = metric != IP
    for chunk in prange(n_chunks):
        q_sq = np.zeros(B, np.float32)
        q_sum = np.zeros(B, np.float32)
        for q in range(B):
            for c in range(dim):
                q_sq[q] += queries[q, c] * queries[q, c]
                q_sum[q] += queries[q, c]
        dots = np.empty((qblock, tile_rows + 1), np.float32)  # + 1: a tile's odd last row is scored twice
        bits = dots.view(np.int32)
        row_sq = np.zeros(tile_rows + 1, np.float32)
        row_scale = np.ones(tile_rows + 1, np.float32)
        row_bias = np.zeros(tile_rows + 1, np.float32)
        rows = np.empty((2, dim), np.float32)  # two rows widened to float32 (fp16, bf16, int4, and int8 for big blocks)
        rows_bits = rows.view(np.uint32)
        thr = np.full(B, FLOOR_KEY, np.int64)
        counts = np.zeros(B, np.int64)
        poison = np.float32(0)
        for tile in range(chunk * tiles_per_chunk, min(n_tiles, (chunk + 1) * tiles_per_chunk)):
            row0 = tile * tile_rows
            n = min(n_rows, row0 + tile_rows) - row0
            for q0 in range(0, B, qblock):
                nq = min(B, q0 + qblock) - q0
                one_row_at_a_time = nq < 4 and kind == INT8  # few queries: score the codes where they lie
                if one_row_at_a_time:
                    if q0 == 0:
                        for j in range(n):
                            r = row0 + j
                            row_scale[j], row_bias[j] = scale[r], bias[r]
                            if needs_row_sq:
                                row_sq[j] = _row_sq(u8, r, dim, row_scale[j], row_bias[j])
                    for i in range(nq):
                        _dots_1(u8, row0, n, queries, q0 + i, dim, dots[i])
                for j in range(0, 0 if one_row_at_a_time else n, 2):
                    r = row0 + j
                    r1 = r + 1 if j + 1 < n else r
                    if q0 == 0 and quantized:
                        row_scale[j], row_bias[j] = scale[r], bias[r]
                        row_scale[j + 1], row_bias[j + 1] = scale[r1], bias[r1]
                    if kind == FP32:  # score the rows where they lie
                        values, a, b = f32, r, r1
                    else:
                        _load_row(kind, r, u16, u8, dim, rows, rows_bits, 0)
                        _load_row(kind, r1, u16, u8, dim, rows, rows_bits, 1)
                        values, a, b = rows, 0, 1
                    if q0 == 0 and needs_row_sq:
                        row_sq[j] = _row_sq(values, a, dim, row_scale[j], row_bias[j])
                        row_sq[j + 1] = _row_sq(values, b, dim, row_scale[j + 1], row_bias[j + 1])
                    _dots_rows(values, a, b, queries, q0, nq, dim, dots, j)
                for i in range(nq):
                    q = q0 + i
                    for j in range(n):
                        dot = row_scale[j] * dots[i, j] + row_bias[j] * q_sum[q] if quantized else dots[i, j]
                        if metric == IP:
                            score = dot
                        elif metric == COSINE:
                            denom = np.sqrt(row_sq[j]) * np.sqrt(q_sq[q])
                            score = dot / denom if denom > 0 else np.float32(0)
                        else:
                            score = -max(row_sq[j] - np.float32(2) * dot + q_sq[q], np.float32(0))
                        dots[i, j] = score + np.float32(0)  # -0.0 -> +0.0: one key per value
                        poison += dots[i, j] * np.float32(0)  # NaN iff some score is NaN or inf
                    _exclude(dots[i], q, tile, row0, bucket_ptr, bucket_ids)
                    counts[q], thr[q] = _admit(bits[i], n, row0, keys_out[chunk, q], counts[q], thr[q], k)
        counts_out[chunk] = counts
        bad_out[chunk] = poison != poison


@njit(nogil=True, cache=True)
def _bucket_exclusions(indptr, ids, tile_rows, n_tiles):
    """Each query's excluded ids grouped by corpus tile (a counting sort): (ptr (B, n_tiles + 1), ids).

    One thread: linear and cheap next to the scan; a parallel region costs more on a busy machine.
    """
    B = indptr.shape[0] - 1
    ptr = np.zeros((B, n_tiles + 1), np.int64)
    out = np.empty_like(ids)
    for q in range(B):
        lo, hi = indptr[q], indptr[q + 1]
        for p in range(lo, hi):
            ptr[q, ids[p] // tile_rows + 1] += 1
        ptr[q, 0] = lo
        for t in range(n_tiles):
            ptr[q, t + 1] += ptr[q, t]
        fill = ptr[q, :n_tiles].copy()
        for p in range(lo, hi):
            t = ids[p] // tile_rows
            out[fill[t]] = ids[p]
            fill[t] += 1
    return ptr, out


def _merge_impl(keys, counts, k, negate, scores_out, ids_out):
    """Per query: the best k of all chunks' candidates, best first, decoded; -1/-inf padding."""
    n_chunks, B, cap = keys.shape
    for q in prange(B):
        total = 0
        for c in range(n_chunks):
            total += counts[c, q]
        pool = np.empty(total, np.int64)
        at = 0
        for c in range(n_chunks):
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


def topk(queries, corpus, k, metric, exclude):
    """queries float32 (B, d); corpus a RowTable; exclude None or host int64 (indptr, ids)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    corpus = corpus.numpy()
    B, dim = queries.shape
    n_rows = corpus.shape[0]
    kind = DTYPE_CODES[corpus.dtype]
    scores_out = np.empty((B, k), np.float32)
    ids_out = np.empty((B, k), np.int64)
    if B == 0:
        return scores_out, ids_out
    # Tiles of about 128 KB of float32 rows: a tile stays in L2 while every query block scores it.
    tile_rows = int(min(512, max(32, 1 << int(np.log2(max(1, TILE_BYTES // (4 * max(dim, 1))))))))
    n_tiles = (n_rows + tile_rows - 1) // tile_rows
    if exclude is None:
        bucket_ptr, bucket_ids = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
    else:
        bucket_ptr, bucket_ids = _bucket_exclusions(exclude[0], exclude[1], tile_rows, n_tiles)
    f32 = corpus.data if kind == FP32 else np.zeros((0, 0), np.float32)
    u16 = corpus.data.view(np.uint16) if kind in (FP16, BF16) else np.zeros((0, 0), np.uint16)
    u8 = corpus.data if kind in (INT8, INT4) else np.zeros((0, 0), np.uint8)
    no_qparams = np.zeros(0, np.float32)
    scale = no_qparams if corpus.scale is None else corpus.scale
    bias = no_qparams if corpus.bias is None else corpus.bias
    # Two chunks per thread (load balance); each chunk's best k per query are merged after.
    n_chunks = max(1, min(n_tiles, 2 * numba.get_num_threads()))
    cap = 2 * k + 16
    keys = np.empty((n_chunks, B, cap), np.int64)
    counts = np.zeros((n_chunks, B), np.int64)
    bad = np.zeros(n_chunks, np.bool_)
    _scan(queries, kind, f32, u16, u8, scale, bias, METRIC_CODES[metric], k, n_rows, tile_rows,
          min(B, QUERY_BLOCK), n_chunks, bucket_ptr, bucket_ids, keys, counts, bad)
    if bad.any():
        raise ValueError("corpus contains NaN or inf (a score came out non-finite)")
    merge = _merge_serial if B < SERIAL_MERGE_BELOW else _merge_parallel
    merge(keys, counts, k, metric == "l2", scores_out, ids_out)
    return scores_out, ids_out
