"""What bounds the embedding lookup on a CUDA device (issue 3): run on a lent GPU.

    python -m bench.gpu_embedding_probe host      # where a public call's host time goes
    python -m bench.gpu_embedding_probe layouts [G ...]   # device time of int8 row layouts vs fp32,
                                                          # at each L2 fetch granularity G (bytes; 0: as found)
    python -m bench.gpu_embedding_probe ncu       # one call of each layout, for ncu --profile-from-start off
    python -m bench.gpu_embedding_probe autotune  # the tile the autotuner picks for each layout, first call at B

Shape: R = 2M, D = 64, L = 32, sum (the gpu_embedding group's large shape). int8 layouts hold
the same codes, scales and biases: "separate" (codes, scale[], bias[]: three places a row),
"qparams interleaved" (scale and bias side by side in one (R, 2) array: two places), "fused 72"
(FBGEMM's layout, one 72-byte row, 8-byte aligned) and "fused 80" (the same, padded to 80 bytes
so that rows are 16-byte aligned).
"""
import cProfile
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.protocol import device_copy_gbps, graph_time_us
from recscore.kernels import RowTable, TableBatch
from recscore.kernels.embedding_bag import triton as triton_lookup

ROWS, DIM, L = 2_000_000, 64, 32
N_SETS = 8


def _per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def host():
    B = 2048
    table = RowTable("fp32", (ROWS, DIM), torch.randn(ROWS, DIM, device="cuda"))
    batch = TableBatch([table])
    indices = torch.randint(0, ROWS, (B * L,), device="cuda")
    offsets = torch.arange(0, B * L + 1, L, device="cuda")
    out = torch.empty((B, DIM), device="cuda")
    errors = torch.zeros(3, dtype=torch.int32, device="cuda")
    meta, base, total_dim, flags, max_dim, row_align, dim_multiple, _ = triton_lookup._prepare(batch)
    args = (base, meta, indices, offsets, out, out, errors, B, total_dim, indices.shape[0], B, max_dim, flags, 0,
            False, row_align, dim_multiple)
    grid = lambda config: (B, -(-max_dim // config["BLOCK_D"]))  # noqa: E731
    launch = triton_lookup._launch_lookup
    batch.lookup_with_flags(indices, offsets)
    rows = [
        ("torch F.embedding_bag", lambda: F.embedding_bag(indices, table.data, offsets, mode="sum",
                                                          include_last_offset=True)),
        ("TableBatch.lookup_with_flags", lambda: batch.lookup_with_flags(indices, offsets)),
        ("TableBatch.lookup_with_flags(flags=)", lambda: batch.lookup_with_flags(indices, offsets, flags=errors)),
        ("TableBatch.lookup (reads flags)", lambda: batch.lookup(indices, offsets)),
        ("triton backend lookup()", lambda: triton_lookup.lookup(batch, indices, offsets, B, "sum", None)),
        ("_prepare(batch)", lambda: triton_lookup._prepare(batch)),
        ("torch.empty((B, D))", lambda: torch.empty((B, DIM), dtype=torch.float32, device="cuda")),
        ("torch.zeros(3, int32)", lambda: torch.zeros(3, dtype=torch.int32, device="cuda")),
        ("LaunchCache.key", lambda: launch.key(args, {})),
        ("LaunchCache launch", lambda: launch(grid, *args)),
        ("indices.contiguous()", lambda: indices.contiguous()),
    ]
    print("| host path, B = 2048 fp32 | us per call |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {statistics.median(_per_call_us(fn, 1000) for _ in range(3)):.1f} |")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        batch.lookup_with_flags(indices, offsets)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


def _int8_layouts():
    codes = torch.randint(0, 256, (ROWS, DIM), dtype=torch.uint8, device="cuda")
    scale = torch.rand(ROWS, device="cuda") * 0.02 + 0.001
    bias = torch.randn(ROWS, device="cuda") * 0.1
    qparams = torch.stack([scale, bias], 1)
    layouts = {"int8 separate": RowTable("int8", (ROWS, DIM), codes, scale, bias),
               "int8 qparams interleaved": RowTable("int8", (ROWS, DIM), codes, qparams[:, 0], qparams[:, 1])}
    for width in (72, 80):
        buffer = torch.zeros((ROWS, width), dtype=torch.uint8, device="cuda")
        buffer[:, :DIM] = codes
        buffer[:, DIM:DIM + 8] = qparams.view(torch.uint8)
        packed = buffer[:, DIM:DIM + 8].view(torch.float32)
        layouts[f"int8 fused {width}"] = RowTable("int8", (ROWS, DIM), buffer[:, :DIM], packed[:, 0], packed[:, 1])
    fp32 = codes.float() * scale[:, None] + bias[:, None]
    layouts = {"fp32": RowTable("fp32", (ROWS, DIM), fp32), **layouts}
    return {name: TableBatch([t]) for name, t in layouts.items()}


def _set_l2_fetch_granularity(n_bytes):
    """cudaLimitMaxL2FetchGranularity of the current context (a hint the driver may clamp); returns
    the value the driver reports afterwards."""
    from cuda.bindings import runtime
    limit = runtime.cudaLimit.cudaLimitMaxL2FetchGranularity
    if n_bytes:
        assert runtime.cudaDeviceSetLimit(limit, n_bytes)[0] == runtime.cudaError_t.cudaSuccess
    error, value = runtime.cudaDeviceGetLimit(limit)
    assert error == runtime.cudaError_t.cudaSuccess
    return value


def layouts(*granularities):
    for granularity in granularities or ("0",):
        _layouts(int(granularity))


def _layouts(granularity):
    torch.zeros(1, device="cuda")   # the context the limit applies to
    reported = _set_l2_fetch_granularity(granularity)
    copy = device_copy_gbps()
    batches = _int8_layouts()
    print(f"L2 fetch granularity: asked {granularity or 'nothing'}, driver reports {reported} B; "
          f"device-to-device copy: {copy:.0f} GB/s")
    print("| B | layout | us per call (graph of 8) | G rows/s | GB/s of row bytes | vs fp32 | max rel err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for B in (2048, 16384):
        index_sets = [torch.randint(0, ROWS, (B * L,), device="cuda") for _ in range(N_SETS)]
        offsets = torch.arange(0, B * L + 1, L, device="cuda")
        expected = batches["fp32"].lookup(index_sets[0], offsets)
        fp32_us = None
        for name, batch in batches.items():
            out = batch.lookup(index_sets[0], offsets)
            err = ((out - expected).abs().max() / expected.abs().max()).item()
            us = graph_time_us(lambda i, b=batch: b.lookup_with_flags(index_sets[i], offsets), N_SETS)
            fp32_us = fp32_us or us
            row_bytes = DIM * 4 if name == "fp32" else DIM + 8
            rows_per_s = B * L / us * 1e-3
            print(f"| {B} | {name} | {us:.2f} | {rows_per_s:.2f} | {rows_per_s * row_bytes:.0f} "
                  f"| {fp32_us / us:.2f}x | {err:.1e} |")


def ncu():
    batches = _int8_layouts()
    for B in (2048, 16384):
        indices = torch.randint(0, ROWS, (B * L,), device="cuda")
        offsets = torch.arange(0, B * L + 1, L, device="cuda")
        for batch in batches.values():
            batch.lookup_with_flags(indices, offsets)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for batch in batches.values():
            batch.lookup_with_flags(indices, offsets)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print("profiled, in order, for B = 2048 then 16384:", ", ".join(batches))


def autotune(B="2048"):
    B = int(B)
    indices = torch.randint(0, ROWS, (B * L,), device="cuda")
    offsets = torch.arange(0, B * L + 1, L, device="cuda")
    for batch in _int8_layouts().values():   # the int8 layouts share one tuning key: the first one tunes
        batch.lookup_with_flags(indices, offsets)
    for key, config in triton_lookup._lookup_kernel.cache.items():
        print(f"B = {B}, key (MAX_DIM, DTYPE_FLAGS, POOLING, DIM_MULTIPLE, ...) {key[:4]}: {config}")


if __name__ == "__main__":
    {"host": host, "layouts": layouts, "ncu": ncu, "autotune": autotune}[sys.argv[1]](*sys.argv[2:])
