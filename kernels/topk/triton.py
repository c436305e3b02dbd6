"""Similarity top-k on the GPU (Triton), in two stages.

Stage 1 (`_partial_topk_kernel`): a program owns BLOCK_Q queries and one split of the
corpus; for each BLOCK_N-row tile it scores the tile with `tl.dot` over BLOCK_D slices
(a lone query, BLOCK_Q = 1, with a multiply and a row sum instead),
turns scores into int64 keys `(order(score) << 32) | (0xFFFFFFFF - id)` (so ties go to
the smaller id, as on the CPU), takes the tile's best K_PAD with `tl.topk` and merges
them into its running best K_PAD in registers (bitonic: max(best, reversed(candidates)),
then a sort). Stage 2: `torch.topk` over the splits' candidates of each query.
Exclusions are a per-query bitmap (one bit per corpus row) built on the device.
int8 rows are scored on their codes: scale * (codes . q) + bias * sum(q).
int4 rows, and k past MAX_K, are scored with torch matmuls on the device instead, a chunk of
rows at a time, into the same keys (with a warning: this path is not tuned).
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted, warn_once
from .._triton_launch import LaunchCache
from .._triton_offsets import matrix_offsets
from ...bindings._cpu import METRIC_CODES, TOPK_FLOOR_KEY

# A program keeps its queries' best K_PAD keys in registers. Compiled for an H100
# (tests/sm90_checks.py), 16 queries a program spill from k = 10 (about 600 bytes of local memory a
# thread up to k = 128) and k = 256 spills 6.5-8.4 KB a thread (not timed on a GPU); k = 512 needs
# 270 KB of shared memory (an H100 has 227 KB) and fails, and its compile takes minutes. Larger k
# is scored with torch matmuls on the device, chunk by chunk, with a warning.
MAX_K = 256
# The torch path (int4 rows, k > MAX_K) scores rows in chunks of at most this many scores and
# this many dequantized elements (a chunk's temporaries: a few hundred MB at most).
TORCH_CHUNK_ELEMENTS = 1 << 22
# a jit function reads only constexpr globals
IP, COSINE, L2 = (tl.constexpr(METRIC_CODES[metric]) for metric in ("ip", "cosine", "l2"))
# The key of score -inf with id 0: every finite score's key is above it. Excluded and
# out-of-range entries get this key and come out as padding.
FLOOR_KEY = TOPK_FLOOR_KEY
FLOOR_KEY_CONSTEXPR = tl.constexpr(FLOOR_KEY)
MAX_ROWS = (1 << 32) - 1   # a key holds a row id in its low 32 bits


@triton.jit
def _partial_topk_kernel(q_ptr, q_sq_ptr, q_sum_ptr, x_ptr, scale_ptr, bias_ptr, excl_ptr, out_ptr, bad_ptr,
                         B, N, D, tiles_per_split, n_splits, words_per_query,
                         METRIC: tl.constexpr, QUANTIZED: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         K_PAD: tl.constexpr):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = rq < B
    q_sq = tl.load(q_sq_ptr + rq, mask=q_ok, other=0.0)
    q_sum = tl.load(q_sum_ptr + rq, mask=q_ok, other=0.0)
    floor = tl.full((BLOCK_Q, BLOCK_N), FLOOR_KEY_CONSTEXPR, tl.int64)
    best = tl.full((BLOCK_Q, K_PAD), FLOOR_KEY_CONSTEXPR, tl.int64)
    bad = tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
    # This split's rows, [first, last): int64, as row ids go up to MAX_ROWS.
    first = split.to(tl.int64) * tiles_per_split * BLOCK_N
    last = tl.minimum((split + 1).to(tl.int64) * tiles_per_split * BLOCK_N, N)
    for start in range(first, last, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = rn < N
        dots = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
        x_sq = tl.zeros((BLOCK_N,), tl.float32)
        if QUANTIZED:  # rows are codes * scale + bias
            s = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
            b = tl.load(bias_ptr + rn, mask=n_ok, other=0.0)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            q = tl.load(q_ptr + matrix_offsets(rq, rd, D), mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            x = tl.load(x_ptr + matrix_offsets(rn, rd, D), mask=n_ok[:, None] & d_ok[None, :], other=0)
            x = x.to(tl.float32)
            if BLOCK_Q >= 16:
                dots = tl.dot(q, tl.trans(x), dots, input_precision="ieee")
            else:  # one query: tl.dot needs 16 rows, and 15 of them would be padding
                dots += tl.sum(q[:, None, :] * x[None, :, :], axis=2)
            if METRIC != IP:
                if QUANTIZED:  # |x|^2 term by term: the expansion in sum(c), sum(c^2) cancels badly
                    values = tl.where(d_ok[None, :], x * s[:, None] + b[:, None], 0.0)
                    x_sq += tl.sum(values * values, axis=1)
                else:
                    x_sq += tl.sum(x * x, axis=1)
        if QUANTIZED:
            dots = s[None, :] * dots + b[None, :] * q_sum[:, None]
        if METRIC == IP:
            score = dots
        elif METRIC == COSINE:
            denom = tl.sqrt(x_sq)[None, :] * tl.sqrt(q_sq)[:, None]
            score = tl.where(denom > 0, dots / tl.where(denom > 0, denom, 1.0), 0.0)
        else:  # l2, negated so that larger is better
            score = -tl.maximum(x_sq[None, :] - 2.0 * dots + q_sq[:, None], 0.0)
        if METRIC != IP:  # the where and the maximum above would turn a NaN or inf row into a score: report it
            finite = (tl.abs(x_sq)[None, :] < float("inf")) & (tl.abs(dots) < float("inf"))
            score = tl.where(finite, score, float("nan"))
        score = score + 0.0  # -0.0 -> +0.0: one key per value
        valid = q_ok[:, None] & n_ok[None, :]
        bad |= (valid & ((score != score) | (tl.abs(score) == float("inf")))).to(tl.int32)
        if HAS_EXCLUDE:
            words = tl.load(excl_ptr + matrix_offsets(rq, rn >> 6, words_per_query), mask=valid, other=0)
            valid = valid & (((words >> (rn[None, :] & 63)) & 1) == 0)
        bits = score.to(tl.int32, bitcast=True)
        order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (order.to(tl.int64) << 32) | (4294967295 - rn)[None, :]
        keys = tl.where(valid, keys, floor)
        candidates = tl.topk(keys, K_PAD, dim=1)
        best = tl.sort(tl.maximum(best, tl.flip(candidates, 1)), dim=1, descending=True)
    rk = tl.arange(0, K_PAD)
    tl.store(out_ptr + matrix_offsets(rq * n_splits + split, rk, K_PAD), best, mask=q_ok[:, None])
    tl.store(bad_ptr + pid_q * n_splits + split, tl.max(tl.max(bad, axis=1), axis=0))


_launch_partial_topk = LaunchCache(_partial_topk_kernel)


def _exclusion_bitmap(exclude, B, N, device):
    """(B, ceil(N/64)) int64 words, bit (id & 63) of word id >> 6 set for each excluded id."""
    indptr, ids = (torch.from_numpy(a).to(device) for a in exclude)
    words = (N + 63) // 64
    query = torch.repeat_interleave(torch.arange(B, device=device), indptr[1:] - indptr[:-1])
    flat = torch.unique(query * N + ids)  # a repeated id would carry into the next bit
    query, ids = flat // max(N, 1), flat % max(N, 1)
    bitmap = torch.zeros(B * words, dtype=torch.int64, device=device)
    bitmap.scatter_add_(0, query * words + (ids >> 6), torch.bitwise_left_shift(torch.ones_like(ids), ids & 63))
    return bitmap.view(B, words), words


def _rows_as_float(corpus, start, stop):
    """Rows [start, stop) of a device corpus as float32 (int8/int4 codes * scale + bias)."""
    data = corpus.data[start:stop]
    if corpus.dtype in ("fp32", "fp16", "bf16"):
        return data.float()
    if corpus.dtype == "int4":   # two codes a byte, low nibble first
        data = torch.stack((data & 15, data >> 4), dim=2).reshape(stop - start, -1)[:, :corpus.shape[1]]
    return data.float() * corpus.scale[start:stop, None] + corpus.bias[start:stop, None]


def _keys_by_torch(queries, corpus, k, metric, exclude):
    """The best k keys a query, scored with torch matmuls on the device a chunk of rows at a time,
    each chunk's best merged into the running best with torch.topk. Dot products run in float64:
    float32 matmuls follow torch's global TF32 setting, which would reorder near-ties."""
    B, N = queries.shape[0], corpus.shape[0]
    device = queries.device
    kept = min(k, N)   # past N every slot is padding
    best = torch.full((B, kept), FLOOR_KEY, dtype=torch.int64, device=device)
    queries64 = queries.double()
    q_sq = (queries64 * queries64).sum(1, keepdim=True)
    chunk = max(1, TORCH_CHUNK_ELEMENTS // max(B, corpus.shape[1], 1))
    if exclude is not None:   # (query, id) pairs sorted by id: a chunk's exclusions are one slice
        indptr, excluded_ids = (torch.from_numpy(a).to(device) for a in exclude)
        excluded_ids, order = torch.sort(excluded_ids)
        excluded_queries = torch.repeat_interleave(torch.arange(B, device=device), indptr[1:] - indptr[:-1])[order]
        bounds = torch.searchsorted(excluded_ids, torch.arange(0, N + chunk, chunk, device=device)).tolist()
    non_finite = torch.zeros((), dtype=torch.bool, device=device)
    for n, start in enumerate(range(0, N, chunk)):
        stop = min(N, start + chunk)
        rows = _rows_as_float(corpus, start, stop).double()
        dots = queries64 @ rows.T
        if metric == "ip":
            score = dots
        elif metric == "cosine":
            row_sq = (rows * rows).sum(1)[None, :]
            denom = torch.sqrt(row_sq) * torch.sqrt(q_sq)
            score = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0)
            score = torch.where(torch.isfinite(row_sq), score, float("nan"))   # as the kernel: report, not 0
        else:   # l2, negated so that larger is better
            score = -torch.clamp((rows * rows).sum(1)[None, :] - 2.0 * dots + q_sq, min=0.0)
        score = score.float() + 0.0   # -0.0 -> +0.0: one key per value
        non_finite |= ~torch.isfinite(score).all()
        ids = torch.arange(start, stop, device=device)
        bits = score.view(torch.int32)
        key_order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (key_order.to(torch.int64) << 32) | (4294967295 - ids)[None, :]
        if exclude is not None:
            lo, hi = bounds[n], bounds[n + 1]
            keys[excluded_queries[lo:hi], excluded_ids[lo:hi] - start] = FLOOR_KEY
        best = torch.topk(torch.cat((best, keys), dim=1), kept, dim=1).values
    if bool(non_finite):   # one wait for the GPU, after the last chunk
        raise ValueError("corpus contains NaN or inf (a score came out non-finite)")
    padding = torch.full((B, k - kept), FLOOR_KEY, dtype=torch.int64, device=device)
    return torch.cat((best, padding), dim=1)


def topk(queries, corpus, k, metric, exclude):
    """queries float torch (B, d); corpus a RowTable; exclude None or host int64 (indptr, ids)."""
    device = queries.device
    if corpus.kind == "numpy" or corpus.device != device:
        corpus = corpus.to(device)
    B, D = queries.shape
    N = corpus.shape[0]
    if N > MAX_ROWS:
        raise ValueError(f"corpus has {N} rows; the Triton top-k numbers rows in 32 bits (at most {MAX_ROWS})")
    queries = queries.to(torch.float32).contiguous()
    if corpus.dtype == "int4" or k > MAX_K:
        if corpus.dtype == "int4":
            warn_once("topk-triton-int4", "topk has no Triton kernel for int4 rows: they are scored with torch "
                      "matmuls on the device")
        else:
            warn_once("topk-triton-k", f"topk's Triton kernel keeps at most k = {MAX_K} candidates a query: "
                      f"larger k is scored with torch matmuls on the device")
        return _scores_and_ids(_keys_by_torch(queries, corpus, k, metric, exclude), metric)
    q_sq = (queries * queries).sum(1)
    q_sum = queries.sum(1)
    k_pad = max(16, triton.next_power_of_2(k))
    block_n = max(64, k_pad)
    block_d = min(64, max(16, triton.next_power_of_2(D)))
    n_tiles = triton.cdiv(N, block_n)
    block_q = 1 if B == 1 else 16   # a lone query skips the padded tl.dot and a 16-row tl.topk
    n_qblocks = triton.cdiv(B, block_q)
    programs = 2 if triton_interpreted() else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    n_splits = max(1, min(n_tiles, triton.cdiv(programs, max(n_qblocks, 1))))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    candidates = torch.empty((B, n_splits, k_pad), dtype=torch.int64, device=device)
    bad = torch.zeros(n_qblocks * n_splits, dtype=torch.int32, device=device)
    if exclude is None:
        bitmap, words = candidates, 0  # not read
    else:
        bitmap, words = _exclusion_bitmap(exclude, B, N, device)
    quantized = corpus.dtype == "int8"
    # The kernel addresses row n at n * D (and scale, bias at n): strided rows are copied first.
    rows = corpus.data
    if not rows.is_contiguous():
        warn_once("topk-triton-corpus-copy", "topk: the corpus rows are not contiguous (a column slice, "
                                             "RowTable.fused()); they are copied on every call")
        rows = rows.contiguous()
    scale = corpus.scale.contiguous() if quantized else q_sq
    bias = corpus.bias.contiguous() if quantized else q_sq
    if B > 0:
        _launch_partial_topk(
            (n_qblocks, n_splits), queries, q_sq, q_sum, rows, scale, bias, bitmap, candidates, bad,
            B, N, D, tiles_per_split, n_splits, words,
            METRIC=METRIC_CODES[metric], QUANTIZED=quantized, HAS_EXCLUDE=exclude is not None,
            BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad)
        if bool(bad.any()):
            raise ValueError("corpus contains NaN or inf (a score came out non-finite)")
    return _scores_and_ids(torch.topk(candidates.view(B, n_splits * k_pad), k, dim=1).values, metric)


def _scores_and_ids(keys, metric):
    """(scores, ids) from the best keys of each query; floor keys are padding (-1, -inf or +inf for l2)."""
    order = (keys >> 32).to(torch.int32)
    values = (order ^ ((order >> 31) & 0x7FFFFFFF)).view(torch.float32)
    ids = 4294967295 - (keys & 4294967295)
    padding = keys <= FLOOR_KEY
    if metric == "l2":
        scores = torch.where(padding, float("inf"), 0.0 - values)
    else:
        scores = torch.where(padding, float("-inf"), values)
    return scores, torch.where(padding, -1, ids)
