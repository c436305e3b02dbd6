"""What bounds the CPU embedding lookup (issue 3): row placement and the int8 line ceiling.

    python -m bench.cpu_embedding_probe [large|small|dlrm|threads]

Shapes: the embedding group's large shape (R = 2M, D = 64, B = 2048, L = 32, sum; the default),
its small one (R = 100k) or its DLRM-like tables (`dlrm`: 26 tables, against torch's per-table loop), 2 threads,
OMP_WAIT_POLICY=PASSIVE as bench.protocol sets. Each case is timed back to back (the same call
32 times in a row) and alternated with torch's fp32 call on the same logical table (40 pairs,
torch first, ours on another index set, so that it finds none of torch's rows in cache; the
benchmark alternates who goes first and gives both the same set), median ms and the median
per-pair ratio (torch / ours).

- fp32 (one table), a table that starts a cache line against one 16 bytes past a line (where
  np.empty puts a large array): 4 lines a 256-byte row against 5, for both sides.
- int8 rows (quantize_rows: codes on a line, 1 line a row, plus the row's (scale, bias) from
  the side-by-side qparams copy, a second line), and the same call with every row reading row
  0's qparams (qparams stride 0, so always in L1): what any layout of one line of codes a row
  could do (two lines at D = 128).
- fp32 with both sides reading rows in order (each call B * L consecutive rows from a random
  start: the hardware prefetcher's best case) and rows drawn from the first 2048 rows only
  (512 KB, held in L2): what each kernel does when random reads from the table's cache level
  are not what bounds it.
- `threads`: our kernel alone on one and two threads (run it under OMP_WAIT_POLICY=PASSIVE and
  =ACTIVE to see what the passive wake-up of the second thread costs).
"""
import os
import statistics
import sys

from bench.protocol import THREADS, _timed, set_threads  # first: it sets OMP_WAIT_POLICY before torch loads libgomp

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.compare_embedding import random_table, torch_bag  # noqa: E402
from recscore.bindings import _embedding_bag  # noqa: E402
from recscore.kernels import TableBatch, quantize_rows  # noqa: E402
from recscore.kernels._cpu import cpu_level  # noqa: E402
from recscore.kernels.embedding_bag import cpu as cpu_lookup  # noqa: E402

ROWS, DIM, B, L = 2_000_000, 64, 2048, 32
N_SETS = 8


def _ms(fn, i):
    return _timed(fn, i % N_SETS) * 1e3


def back_to_back(fn, calls=32):
    return statistics.median(_ms(fn, i) for i in range(calls))


def alternated(peer, ours, pairs=40):
    peer_ms, our_ms = [], []
    for i in range(pairs):
        peer_ms.append(_ms(peer, i))
        our_ms.append(_ms(ours, i + 3))
    return statistics.median(peer_ms), statistics.median(our_ms), statistics.median(
        p / o for p, o in zip(peer_ms, our_ms))


def int8_calls(batch, index_sets, offsets, bags, columns):
    """The int8 batch's C kernel as is, and with every row reading its table's row-0 qparams."""
    _, description, _ = cpu_lookup._prepare(batch)
    row0_qparams = description.copy()
    row0_qparams[:, cpu_lookup.DESCRIPTION_COLUMNS.index("qparams_stride")] = 0
    out = np.empty((bags, columns), np.float32)

    def call(tables):
        def run(i):
            return _embedding_bag.lookup(tables, index_sets[i], offsets, None, bags, cpu_lookup.POOLING_CODES["sum"],
                                         True, out, THREADS, cpu_level())
        run.batch = batch   # holds the buffers whose addresses `tables` lists
        return run
    return call(description), call(row0_qparams)


def single_table_cases(rng, rows):
    aligned = random_table(rng, rows, DIM)
    numpy_placed = np.empty_like(aligned)
    numpy_placed[...] = aligned
    index_sets = [rng.integers(0, rows, B * L) for _ in range(N_SETS)]
    in_order = [(rng.integers(0, rows) + np.arange(B * L)) % rows for _ in range(N_SETS)]
    in_l2 = [rng.integers(0, 2048, B * L) for _ in range(N_SETS)]
    offsets = np.arange(0, B * L + 1, L, dtype=np.int64)
    torch_offsets = torch.from_numpy(offsets[:-1])

    def torch_call(table, sets=index_sets):
        bag = torch_bag(table)
        torch_sets = [torch.from_numpy(s) for s in sets]
        return lambda i: bag(torch_sets[i], torch_offsets)

    def our_call(table, sets=index_sets):
        batch = TableBatch([table])
        return lambda i: batch.lookup(sets[i], offsets)

    int8, int8_row0_qparams = int8_calls(TableBatch([quantize_rows(aligned, "int8")]), index_sets, offsets, B, DIM)
    print(f"R={rows} D={DIM} B={B} L={L}, {THREADS} threads; aligned table at {aligned.ctypes.data % 64} "
          f"bytes past a line, NumPy-placed at {numpy_placed.ctypes.data % 64}")
    torch_aligned = torch_call(aligned)
    return [("fp32 on a line", torch_aligned, our_call(aligned)),
            ("fp32 NumPy-placed", torch_call(numpy_placed), our_call(numpy_placed)),
            ("int8 rows (kernel only)", torch_aligned, int8),
            ("int8, qparams always in L1", torch_aligned, int8_row0_qparams),
            ("fp32, rows in order", torch_call(aligned, in_order), our_call(aligned, in_order)),
            ("fp32, rows from the first 2048 (L2)", torch_call(aligned, in_l2), our_call(aligned, in_l2))]


def dlrm_cases(rng):
    """The embedding group's DLRM-like tables (its own draw of L), against the per-table torch loop."""
    rows = np.geomspace(1_000, 4_000_000, 26).astype(np.int64)
    dims = [128 if r < 100_000 else 64 for r in rows]
    pooling_factors = rng.integers(1, 41, len(rows))
    tables = [random_table(rng, int(r), d) for r, d in zip(rows, dims)]
    offsets = np.concatenate([[0], np.cumsum(np.repeat(pooling_factors, B))]).astype(np.int64)
    index_sets = [np.concatenate([rng.integers(0, r, B * f) for r, f in zip(rows, pooling_factors)])
                  for _ in range(N_SETS)]
    starts = offsets[::B]
    bags = [torch_bag(t) for t in tables]
    torch_inputs = [[(torch.from_numpy(s[starts[t]:starts[t + 1]]), torch.from_numpy(np.arange(0, B * f, f)))
                     for t, f in enumerate(pooling_factors)] for s in index_sets]
    int8, int8_row0_qparams = int8_calls(TableBatch([quantize_rows(t, "int8") for t in tables]), index_sets, offsets,
                                         B, sum(dims))
    print(f"DLRM-like: T={len(rows)} R=1k..4M D=64/128 B={B} L=1..40 (sum {pooling_factors.sum()}), {THREADS} threads")

    def torch_loop(i):
        return torch.cat([bag(indices, bag_starts) for bag, (indices, bag_starts) in zip(bags, torch_inputs[i])], dim=1)
    return [("int8 rows (kernel only)", torch_loop, int8), ("int8, qparams always in L1", torch_loop, int8_row0_qparams)]


def thread_scaling(rng):
    """Our kernel alone on 1 and 2 threads, back to back, on fp32 tables of 1000 rows (in L2: the
    floor), the small and the large shape's: what waking and joining the second thread costs
    under the run's OMP_WAIT_POLICY."""
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; ms, back to back")
    for rows in (1_000, 100_000, ROWS):
        table = random_table(rng, rows, DIM)
        index_sets = [rng.integers(0, rows, B * L) for _ in range(N_SETS)]
        offsets = np.arange(0, B * L + 1, L, dtype=np.int64)
        batch = TableBatch([table])
        _, description, _ = cpu_lookup._prepare(batch)
        out = np.empty((B, DIM), np.float32)
        times = {}
        for threads in (1, 2, 1, 2):
            def call(i):
                return _embedding_bag.lookup(description, index_sets[i], offsets, None, B, cpu_lookup.POOLING_CODES["sum"],
                                             True, out, threads, cpu_level())
            times.setdefault(threads, []).append(back_to_back(call, 64))
        print(f"R={rows}: " + ", ".join(f"{n} thread(s) {min(t):.3f}" for n, t in times.items()))


def main(argv=None):
    mode = (argv if argv is not None else sys.argv[1:]) or ["large"]
    set_threads()
    if mode[0] == "threads":
        return thread_scaling(np.random.default_rng(0))
    rng = np.random.default_rng(0)
    cases = {"large": lambda: single_table_cases(rng, ROWS), "small": lambda: single_table_cases(rng, 100_000),
             "dlrm": lambda: dlrm_cases(rng)}[mode[0]]()
    with torch.no_grad():
        for _, peer, ours in cases:
            for i in range(4):
                peer(i), ours(i)
        print("| case | torch back to back | ours back to back | torch alternated | ours alternated | ratio alternated |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, peer, ours in cases:
            peer_b2b, our_b2b = back_to_back(peer), back_to_back(ours)
            peer_alt, our_alt, ratio = alternated(peer, ours)
            print(f"| {name} | {peer_b2b:.3f} | {our_b2b:.3f} | {peer_alt:.3f} | {our_alt:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
