"""The GPU's random-row ceiling: how many random rows a second a bare gather reads, by row size.

    python -m bench.gpu_gather_ceiling      # needs a CUDA device; prints a markdown table

The embedding lookup reads rows at random; below some rate the bound is not bytes but the
number of rows. This kernel does nothing but that: each program loads ROWS indices, then the
(ROWS, row bytes) tile of a 2M-row table at those indices, and folds it into one int32 so that
the loads stay. Rows of 64 bytes (an int8 row at D = 64) against 256 (fp32 at D = 64), at
several tile heights and warp counts, over 524288 uniform random rows (the lookup's B = 16384,
L = 32), timed as CUDA-graph replays of 8 calls over rotated index sets.
"""
import torch
import triton
import triton.language as tl

from bench.protocol import device_copy_gbps, graph_time_us

TABLE_ROWS, N_ROWS, N_SETS = 2_000_000, 16384 * 32, 8


@triton.jit
def _gather_kernel(table_ptr, indices_ptr, out_ptr, ROW_WORDS: tl.constexpr, ROWS: tl.constexpr):
    program = tl.program_id(0)
    index = tl.load(indices_ptr + program * ROWS + tl.arange(0, ROWS))
    words = tl.load(table_ptr + index[:, None] * ROW_WORDS + tl.arange(0, ROW_WORDS)[None, :])
    tl.store(out_ptr + program, tl.sum(tl.sum(words, axis=1), axis=0))


def main():
    copy = device_copy_gbps()
    print(f"device-to-device copy: {copy:.0f} GB/s")
    print("| row bytes | rows a program | warps | us per 524288 rows | G rows/s | GB/s of rows |\n|---:|---:|---:|---:|---:|---:|")
    for row_bytes in (64, 256):
        table = torch.randint(-2**31, 2**31 - 1, (TABLE_ROWS, row_bytes // 4), dtype=torch.int32, device="cuda")
        index_sets = [torch.randint(0, TABLE_ROWS, (N_ROWS,), device="cuda") for _ in range(N_SETS)]
        for rows in (8, 32, 128):
            out = torch.empty(N_ROWS // rows, dtype=torch.int32, device="cuda")
            for warps in (1, 4):
                def run(i):
                    _gather_kernel[(N_ROWS // rows,)](table, index_sets[i], out, ROW_WORDS=row_bytes // 4, ROWS=rows,
                                                      num_warps=warps)
                us = graph_time_us(run, N_SETS)
                expected = table[index_sets[N_SETS - 1]].view(-1, rows * row_bytes // 4).sum(1, dtype=torch.int32)
                assert torch.equal(out, expected), "the gather read the wrong rows"
                print(f"| {row_bytes} | {rows} | {warps} | {us:.1f} | {N_ROWS / us / 1e3:.2f} "
                      f"| {N_ROWS * row_bytes / us / 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
