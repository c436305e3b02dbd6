"""Pooled embedding lookup on a CUDA device (issue 3, GPU targets): the Triton kernel against
torch.nn.EmbeddingBag on the same GPU and the same table memory.

    python -m bench.compare gpu_embedding        # needs a CUDA device

Large shape: R = 2M, D = 64, B = 2048, L = 32, sum, 8 rotated index sets (uniform random rows).
- fp32 and fp16: ours (public embedding_bag, validation included) vs F.embedding_bag on the very
  tensor our RowTable holds (target 1.5x); GB/s counts the rows a call must read, against the
  device-to-device copy measured in the same run (target 80%).
- int8 / int4 rows: ours vs our own fp32 lookup of the same logical table (target int8 2.5x);
  "int8 fused" stores the int8 table in FBGEMM's layout (RowTable.fused()), one 72-byte row.
- "lookup_with_flags" rows time the lookup that does not read the kernel's error flags (the
  public call's one wait for the GPU), setting them in one persistent buffer (flags=, FBGEMM's
  warning counter): against embedding_bag, what that wait costs at this size; against torch
  (which never waits: a bad index is a device-side assert), the host-side launch paths alone.
- "device time" rows replay CUDA graphs of 8 such calls (one per index set) against graphs of 8
  torch calls: the GPU's own time, without Python or launch gaps; the GB/s target is read off
  these rows. One fp32 row gives each call new zeroed flags instead (a fill kernel a call).
DLRM-like: 26 tables (R 1k..4M, D 64/128, L 1..40), TableBatch.lookup (one launch) vs one
F.embedding_bag per table + torch.cat (no target on the GPU).
"""
import numpy as np
import torch
import torch.nn.functional as F

from bench.protocol import Comparison, cuda_graph_of, quantize_in_slices
from recscore.kernels import RowTable, TableBatch, embedding_bag

DEVICE = "cuda"
B = 2048
N_SETS = 8


def _device_table(rng, rows, dim, dtype):
    """A random normal table of `dtype` rows on the GPU (int8/int4 quantized on the host in slices;
    "int8 fused": FBGEMM's layout, codes, scale and bias in one 72-byte row at D = 64)."""
    if dtype in ("fp32", "fp16"):
        data = torch.randn(rows, dim, device=DEVICE)
        return RowTable(dtype, (rows, dim), data if dtype == "fp32" else data.half())
    table = quantize_in_slices(lambda start, stop: rng.standard_normal((stop - start, dim), dtype=np.float32), rows,
                               dtype.split()[0], 1 << 18)
    return (table.fused() if dtype.endswith("fused") else table).to(DEVICE)


def large_cases(rng, rows, dim, pooling_factor):
    index_sets = [torch.randint(0, rows, (B * pooling_factor,), device=DEVICE) for _ in range(N_SETS)]
    offsets = torch.arange(0, B * pooling_factor + 1, pooling_factor, device=DEVICE)
    row_reads = B * pooling_factor
    shape = f"large R={rows // 1000}k D={dim} B={B} L={pooling_factor}"
    tables = {dtype: _device_table(rng, rows, dim, dtype) for dtype in ("fp32", "fp16", "int8", "int8 fused", "int4")}

    def ours_of(table):
        return lambda i: embedding_bag(table, index_sets[i], offsets)

    def peer_of(weight):
        return lambda i: F.embedding_bag(index_sets[i], weight, offsets, mode="sum", include_last_offset=True)

    for dtype, elem in (("fp32", 4), ("fp16", 2)):
        yield Comparison(f"{shape} {dtype}", f"recscore triton {dtype}", f"torch.nn.EmbeddingBag cuda {dtype}",
                         ours_of(tables[dtype]), peer_of(tables[dtype].data), target=1.5,
                         bytes_per_call=row_reads * dim * elem, device=DEVICE,
                         note="GB/s target: 80% of the device copy")
    batches = {dtype: TableBatch([tables[dtype]]) for dtype in ("fp32", "int8", "int8 fused")}
    flags = {dtype: torch.zeros(3, dtype=torch.int32, device=DEVICE) for dtype in batches}

    def no_wait(dtype):
        return lambda i: batches[dtype].lookup_with_flags(index_sets[i], offsets, flags=flags[dtype])

    yield Comparison(f"{shape} fp32, lookup_with_flags", "recscore triton fp32, TableBatch.lookup_with_flags",
                     "recscore triton fp32 (embedding_bag)", no_wait("fp32"), ours_of(tables["fp32"]),
                     bytes_per_call=row_reads * dim * 4, device=DEVICE, note="what reading the error flags costs")
    yield Comparison(f"{shape} fp32, lookup_with_flags vs torch", "recscore triton fp32, TableBatch.lookup_with_flags",
                     "torch.nn.EmbeddingBag cuda fp32", no_wait("fp32"), peer_of(tables["fp32"].data),
                     bytes_per_call=row_reads * dim * 4, device=DEVICE, note="neither side waits for the GPU")
    kernel = {dtype: cuda_graph_of(no_wait(dtype), N_SETS) for dtype in ("fp32", "int8", "int8 fused")}
    torch_fp32 = cuda_graph_of(peer_of(tables["fp32"].data), N_SETS)
    graph = f"device time, graph of {N_SETS} calls"
    yield Comparison(f"{shape} fp32, {graph}", "recscore triton fp32 kernel", "torch.nn.EmbeddingBag cuda fp32",
                     kernel["fp32"], torch_fp32, n_sets=1, target=1.5, bytes_per_call=N_SETS * row_reads * dim * 4,
                     device=DEVICE, note="GB/s target: 80% of the device copy")
    new_flags = cuda_graph_of(lambda i: batches["fp32"].lookup_with_flags(index_sets[i], offsets), N_SETS)
    yield Comparison(f"{shape} fp32, {graph}, new flags a call", "recscore triton fp32 kernel + flag fill",
                     "torch.nn.EmbeddingBag cuda fp32", new_flags, torch_fp32, n_sets=1,
                     bytes_per_call=N_SETS * row_reads * dim * 4, device=DEVICE)
    for dtype in ("int8", "int8 fused"):
        yield Comparison(f"{shape} {dtype} rows, {graph}", f"recscore triton {dtype} kernel", "recscore triton fp32 kernel",
                         kernel[dtype], kernel["fp32"], n_sets=1, target=2.5,
                         bytes_per_call=N_SETS * row_reads * (dim + 8), device=DEVICE,
                         note="same logical table; codes + fp32 scale/bias" + (" in one row" if "fused" in dtype else ""))
    # The same table with 8x the bags: enough rows in flight for bandwidth, not latency, to bound.
    big_b = 8 * B
    big_sets = [torch.randint(0, rows, (big_b * pooling_factor,), device=DEVICE) for _ in range(N_SETS)]
    big_offsets = torch.arange(0, big_b * pooling_factor + 1, pooling_factor, device=DEVICE)
    big = {dtype: cuda_graph_of(lambda i, d=dtype: batches[d].lookup_with_flags(big_sets[i], big_offsets,
                                                                             flags=flags[d]), N_SETS)
           for dtype in ("fp32", "int8", "int8 fused")}
    big_torch = cuda_graph_of(lambda i: F.embedding_bag(big_sets[i], tables["fp32"].data, big_offsets, mode="sum",
                                                        include_last_offset=True), N_SETS)
    big_shape = f"large R={rows // 1000}k D={dim} B={big_b} L={pooling_factor}"
    yield Comparison(f"{big_shape} fp32, {graph}", "recscore triton fp32 kernel", "torch.nn.EmbeddingBag cuda fp32",
                     big["fp32"], big_torch, n_sets=1, bytes_per_call=N_SETS * big_b * pooling_factor * dim * 4,
                     device=DEVICE)
    for dtype in ("int8", "int8 fused"):
        yield Comparison(f"{big_shape} {dtype} rows, {graph}", f"recscore triton {dtype} kernel",
                         "recscore triton fp32 kernel", big[dtype], big["fp32"], n_sets=1,
                         bytes_per_call=N_SETS * big_b * pooling_factor * (dim + 8), device=DEVICE)
    for dtype, row_bytes, target in (("int8", dim, 2.5), ("int4", dim // 2, None)):
        yield Comparison(f"{shape} {dtype} rows", f"recscore triton {dtype}", "recscore triton fp32",
                         ours_of(tables[dtype]), ours_of(tables["fp32"]), target=target,
                         bytes_per_call=row_reads * (row_bytes + 8), device=DEVICE,
                         note="same logical table; codes + fp32 scale/bias")


def dlrm_cases(rng):
    n_tables = 26
    rows = np.geomspace(1_000, 4_000_000, n_tables).astype(np.int64)
    dims = [128 if r < 100_000 else 64 for r in rows]
    pooling_factors = rng.integers(1, 41, n_tables)
    tables = [torch.randn(int(r), d, device=DEVICE) for r, d in zip(rows, dims)]
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(np.repeat(pooling_factors, B))])).to(DEVICE)
    index_sets = [torch.cat([torch.randint(0, int(r), (B * L,), device=DEVICE) for r, L in zip(rows, pooling_factors)])
                  for _ in range(N_SETS)]
    starts = offsets[::B].tolist()
    per_table_offsets = [torch.arange(0, B * L + 1, L, device=DEVICE) for L in pooling_factors]
    batch = TableBatch([RowTable("fp32", tuple(t.shape), t) for t in tables])
    row_reads = B * int(pooling_factors.sum())
    row_bytes = float(np.dot(pooling_factors, dims)) / pooling_factors.sum() * 4

    def peer(i):
        return torch.cat([F.embedding_bag(index_sets[i][starts[t]:starts[t + 1]], weight, per_table_offsets[t],
                                          mode="sum", include_last_offset=True) for t, weight in enumerate(tables)], 1)

    yield Comparison(f"DLRM-like T={n_tables} R=1k..{rows[-1] // 1000}k D=64/128 B={B} L=1..40 fp32",
                     "recscore triton TableBatch fp32", "torch.nn.EmbeddingBag cuda fp32, per-table loop",
                     lambda i: batch.lookup(index_sets[i], offsets), peer, bytes_per_call=row_reads * row_bytes,
                     device=DEVICE)


def comparisons(quick=False):
    rng = np.random.default_rng(2026)
    yield from large_cases(rng, 200_000 if quick else 2_000_000, 64, 32)
    if not quick:
        yield from dlrm_cases(rng)
