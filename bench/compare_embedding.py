"""Pooled embedding lookup (issue 3) against torch.nn.EmbeddingBag on the same table memory.

    python -m bench.compare embedding

Peers: torch.nn.EmbeddingBag (fp32 and fp16; FBGEMM's JIT kernels on the CPU), built with
from_pretrained(torch.from_numpy(table), freeze=True), which shares our NumPy buffer (checked:
same data pointer). FBGEMM's own CPU TBE (`fbgemm-gpu-cpu` 1.9.0) installs but its .so does
not load beside torch 2.13.0, so it is not a peer here.

Shapes (B = 2048, 8 rotated index sets each, uniform random rows):
- small: R = 100k, D = 64, L = 32, sum (6.4 M floats: mostly in the 32 MB L3);
- large: R = 2M, D = 64, L = 32, sum (512 MB fp32: random DRAM reads);
- DLRM-like: 26 tables, R log-spaced 1k..4M, D = 128 below 100k rows else 64, L per table
  drawn from 1..40; TableBatch.lookup vs one EmbeddingBag call per table + torch.cat.
- online (no target in issue 3): what a host service answering one request sees, B = 1 and 16
  on the large table and on the DLRM-like tables (the first B bags of each index set). As the
  peer's EmbeddingBag module is built once and called per request, our side is a TableBatch
  over the same buffer built once (embedding_bag, stateless like F.embedding_bag, builds one
  on every call).
Every table starts on a cache line (64 bytes), as torch's CPU allocator places an EmbeddingBag's
own weight and quantize_rows its new storage; glibc's malloc, under NumPy, puts a large array 16
bytes past a line, so that a 256-byte row spans 5 lines instead of 4. The "NumPy-placed" case
(no target) runs the large fp32 shape on such a table, both sides reading it. The "skewed rows"
case (no target) draws the large shape's rows with P(rank k) ~ 1/k over a random permutation of
the table (log-uniform ranks: the hottest 1% of rows take about 70% of the reads), as real
sparse features do: most reads hit cached rows.
Our side is the public API (embedding_bag / TableBatch.lookup, validation included). The "int8
fused rows" cases (no target) store the same int8 tables as RowTables over one buffer of
FBGEMM-layout rows (codes, scale, bias), which the CPU kernel reads in place: what quantize_rows
would gain by storing that layout.
"""
import numpy as np
import torch

from bench.protocol import Comparison
from recscore.kernels import TableBatch, aligned_empty, embedding_bag, quantize_rows
from recscore.kernels._backend import aligned_copy

B = 2048
N_SETS = 8


def random_table(rng, rows, dim):
    return rng.standard_normal((rows, dim), dtype=np.float32, out=aligned_empty((rows, dim), np.float32))


def torch_bag(table):
    """An EmbeddingBag over the same memory as `table` (NumPy float32/float16)."""
    weight = torch.from_numpy(table)
    bag = torch.nn.EmbeddingBag.from_pretrained(weight, freeze=True, mode="sum")
    assert bag.weight.data_ptr() == table.ctypes.data, "EmbeddingBag copied the table"
    return bag


def skewed_rows(rng, rows, n):
    """n row indices with P(rank k) ~ 1/k (k = 1..rows), the ranks scattered over the table."""
    ranks = np.floor(np.exp(rng.random(n) * np.log(rows + 1))).astype(np.int64) - 1
    return rng.permutation(rows)[np.minimum(ranks, rows - 1)]


def single_table_cases(rng, name, rows, dim, pooling_factor, int8_target, online_batches=(), numpy_placed=False):
    table = random_table(rng, rows, dim)
    index_sets = [rng.integers(0, rows, B * pooling_factor) for _ in range(N_SETS)]
    offsets = np.arange(0, B * pooling_factor + 1, pooling_factor, dtype=np.int64)
    torch_sets = [torch.from_numpy(s) for s in index_sets]
    torch_offsets = torch.from_numpy(offsets[:-1])
    row_reads = B * pooling_factor
    shape = f"{name} R={rows // 1000}k D={dim} B={B} L={pooling_factor}"

    def peer_of(bag, sets=torch_sets, bag_starts=torch_offsets):
        def run(i):
            with torch.no_grad():
                return bag(sets[i], bag_starts)
        return run

    def ours_of(stored, sets=index_sets, bag_offsets=offsets):
        return lambda i: embedding_bag(stored, sets[i], bag_offsets)

    torch_fp32 = peer_of(torch_bag(table))
    one_table = TableBatch([table])
    for bags in online_batches:
        online_sets = [s[:bags * pooling_factor] for s in index_sets]
        yield Comparison(f"online {name} R={rows // 1000}k D={dim} B={bags} L={pooling_factor} fp32",
                         "recscore cpu fp32, TableBatch", "torch.nn.EmbeddingBag fp32",
                         lambda i, sets=online_sets, starts=offsets[:bags + 1]: one_table.lookup(sets[i], starts),
                         peer_of(torch_bag(table), [torch.from_numpy(s) for s in online_sets], torch_offsets[:bags]),
                         pairs=200, bytes_per_call=bags * pooling_factor * dim * 4,
                         note="both sides hold their table object across calls")
    yield Comparison(f"{shape} fp32", "recscore cpu fp32", "torch.nn.EmbeddingBag fp32", ours_of(table), torch_fp32,
                     target=1.2, bytes_per_call=row_reads * dim * 4)
    if numpy_placed:
        misaligned = np.empty_like(table)
        misaligned[...] = table
        yield Comparison(f"{shape} fp32, NumPy-placed table", "recscore cpu fp32", "torch.nn.EmbeddingBag fp32",
                         ours_of(misaligned), peer_of(torch_bag(misaligned)), bytes_per_call=row_reads * dim * 4,
                         note=f"table {misaligned.ctypes.data % 64} bytes past a cache line, as np.empty placed it")
        del misaligned
        skewed_sets = [skewed_rows(rng, rows, row_reads) for _ in range(N_SETS)]
        yield Comparison(f"{shape} fp32, skewed rows", "recscore cpu fp32", "torch.nn.EmbeddingBag fp32",
                         ours_of(table, skewed_sets),
                         peer_of(torch_bag(table), [torch.from_numpy(s) for s in skewed_sets]),
                         bytes_per_call=row_reads * dim * 4, note="P(rank k) ~ 1/k: most reads hit cached rows")
    table_fp16 = aligned_copy(table, np.float16)
    yield Comparison(f"{shape} fp16", "recscore cpu fp16", "torch.nn.EmbeddingBag fp16", ours_of(table_fp16),
                     peer_of(torch_bag(table_fp16)), target=1.0, bytes_per_call=row_reads * dim * 2)
    del table_fp16
    table_int8 = quantize_rows(table, "int8")
    yield Comparison(f"{shape} int8 rows", "recscore cpu int8", "torch.nn.EmbeddingBag fp32", ours_of(table_int8),
                     torch_fp32, target=int8_target, bytes_per_call=row_reads * (dim + 8),
                     note="same logical table, stored as int8 rows + fp32 scale/bias")
    if int8_target is not None:
        yield Comparison(f"{shape} int8 fused rows", "recscore cpu int8, fused rows", "torch.nn.EmbeddingBag fp32",
                         ours_of(table_int8.fused()), torch_fp32, bytes_per_call=row_reads * (dim + 8),
                         note="int8 codes, scale and bias in one 72-byte row (FBGEMM's layout), as a RowTable")


def dlrm_cases(rng, quick, online_batches=()):
    n_tables = 8 if quick else 26
    rows = np.geomspace(1_000, 200_000 if quick else 4_000_000, n_tables).astype(np.int64)
    dims = [128 if r < 100_000 else 64 for r in rows]
    pooling_factors = rng.integers(1, 41, n_tables)
    tables = [random_table(rng, int(r), d) for r, d in zip(rows, dims)]
    offsets = np.concatenate([[0], np.cumsum(np.repeat(pooling_factors, B))]).astype(np.int64)
    index_sets = [np.concatenate([rng.integers(0, r, B * L) for r, L in zip(rows, pooling_factors)])
                  for _ in range(N_SETS)]
    # The peer's per-table inputs are views of the same index buffers.
    starts = offsets[::B]
    torch_inputs = [[(torch.from_numpy(s[starts[t]:starts[t + 1]]),
                      torch.from_numpy(np.arange(0, B * L, L, dtype=np.int64)))
                     for t, L in enumerate(pooling_factors)] for s in index_sets]
    shape = f"DLRM-like T={n_tables} R=1k..{rows[-1] // 1000}k D=64/128 B={B} L=1..40"
    row_reads = B * int(pooling_factors.sum())
    row_bytes = float(np.dot(pooling_factors, dims)) / pooling_factors.sum()

    def peer_of(bags, inputs=torch_inputs):
        def run(i):
            with torch.no_grad():
                return torch.cat([bag(idx, off) for bag, (idx, off) in zip(bags, inputs[i])], dim=1)
        return run

    def ours_of(stored_tables, sets=index_sets, bag_offsets=offsets):
        batch = TableBatch(stored_tables)
        return lambda i: batch.lookup(sets[i], bag_offsets)

    torch_fp32 = peer_of([torch_bag(t) for t in tables])
    for bags in online_batches:
        # The first `bags` bags of each table: per table, a prefix of its part of the index set.
        online_sets = [np.concatenate([s[starts[t]:starts[t] + bags * L] for t, L in enumerate(pooling_factors)])
                       for s in index_sets]
        online_offsets = np.concatenate([[0], np.cumsum(np.repeat(pooling_factors, bags))]).astype(np.int64)
        online_torch = [[(idx[:bags * L], off[:bags]) for (idx, off), L in zip(inputs, pooling_factors)]
                        for inputs in torch_inputs]
        yield Comparison(f"online DLRM-like T={n_tables} B={bags} L=1..40 fp32", "recscore cpu TableBatch fp32",
                         "torch.nn.EmbeddingBag fp32, per-table loop", ours_of(tables, online_sets, online_offsets),
                         peer_of([torch_bag(t) for t in tables], online_torch), pairs=200,
                         bytes_per_call=bags * float(np.dot(pooling_factors, dims)) * 4)
    yield Comparison(f"{shape} fp32", "recscore cpu TableBatch fp32", "torch.nn.EmbeddingBag fp32, per-table loop",
                     ours_of(tables), torch_fp32, target=1.5, bytes_per_call=row_reads * row_bytes * 4)
    tables_int8 = [quantize_rows(t, "int8") for t in tables]
    yield Comparison(f"{shape} int8 rows", "recscore cpu TableBatch int8", "torch.nn.EmbeddingBag fp32, per-table loop",
                     ours_of(tables_int8), torch_fp32, target=4.0, bytes_per_call=row_reads * (row_bytes + 8),
                     note="same logical tables, stored as int8 rows + fp32 scale/bias")
    tables_int8 = [t.fused() for t in tables_int8]
    yield Comparison(f"{shape} int8 fused rows", "recscore cpu TableBatch int8, fused rows",
                     "torch.nn.EmbeddingBag fp32, per-table loop", ours_of(tables_int8), torch_fp32,
                     bytes_per_call=row_reads * (row_bytes + 8),
                     note="int8 codes, scale and bias in one row per table (FBGEMM's layout), as RowTables")
    del tables_int8, torch_fp32
    tables_fp16 = [aligned_copy(t, np.float16) for t in tables]
    del tables
    yield Comparison(f"{shape} fp16", "recscore cpu TableBatch fp16", "torch.nn.EmbeddingBag fp16, per-table loop",
                     ours_of(tables_fp16), peer_of([torch_bag(t) for t in tables_fp16]), target=1.0,
                     bytes_per_call=row_reads * row_bytes * 2)


def comparisons(quick=False):
    rng = np.random.default_rng(2026)
    yield from single_table_cases(rng, "small", 20_000 if quick else 100_000, 64, 32, None)
    yield from single_table_cases(rng, "large", 200_000 if quick else 2_000_000, 64, 32, 4.0, online_batches=(1, 16),
                                  numpy_placed=True)
    yield from dlrm_cases(rng, quick, online_batches=(1, 16))
