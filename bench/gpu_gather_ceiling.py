"""The GPU's random-row ceiling: how many random rows a second a bare gather reads, by row size.

    python -m bench.gpu_gather_ceiling [B ...]   # needs a CUDA device; default B = 2048 16384

The embedding lookup reads rows at random; below some rate the bound is not bytes but the
number of rows. This kernel does nothing but that: each program loads ROWS indices, then the
(ROWS, row bytes) tile of a 2M-row table at those indices, and folds it into one int32 so that
the loads stay. Rows of 64 bytes (an int8 row at D = 64) against 256 (fp32 at D = 64), at
several tile heights and warp counts, over B * 32 uniform random rows (the lookup's shape at
L = 32), timed as CUDA-graph replays of 8 calls over rotated index sets. "64 + 8" also reads
each row's 8 bytes of int8 qparams (scale and bias side by side) from a second (R, 2) array, as
an int8 row needs them: one more 32-byte sector a row from DRAM. "via offsets" adds the
lookup's first dependent load: each program reads its bag's start from an offsets array, then
the bag's 32 indices, then the rows. An empty kernel of B programs gives the launch floor of a
call in the same graphs.
"""
import sys

import torch
import triton
import triton.language as tl

from bench.protocol import device_copy_gbps, graph_time_us

TABLE_ROWS, POOLING_FACTOR, N_SETS = 2_000_000, 32, 8


@triton.jit
def _gather_kernel(table_ptr, qparams_ptr, indices_ptr, offsets_ptr, out_ptr, ROW_WORDS: tl.constexpr,
                   ROWS: tl.constexpr, HAS_QPARAMS: tl.constexpr, VIA_OFFSETS: tl.constexpr):
    program = tl.program_id(0)
    if VIA_OFFSETS:
        start = tl.load(offsets_ptr + program)
    else:
        start = program * ROWS
    index = tl.load(indices_ptr + start + tl.arange(0, ROWS))
    words = tl.load(table_ptr + index[:, None] * ROW_WORDS + tl.arange(0, ROW_WORDS)[None, :])
    total = tl.sum(tl.sum(words, axis=1), axis=0)
    if HAS_QPARAMS:
        total += tl.sum(tl.sum(tl.load(qparams_ptr + index[:, None] * 2 + tl.arange(0, 2)[None, :]), axis=1), axis=0)
    tl.store(out_ptr + program, total)


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1)


def main(bag_counts):
    copy = device_copy_gbps()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)")
    print("| B | row bytes | rows a program | warps | via offsets | us a call | G rows/s | GB/s of rows | % of copy |\n"
          "|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    tables = {row_bytes: torch.randint(-2**31, 2**31 - 1, (TABLE_ROWS, row_bytes // 4), dtype=torch.int32,
                                       device="cuda")
              for row_bytes in (64, 256)}
    qparams = torch.randint(-2**31, 2**31 - 1, (TABLE_ROWS, 2), dtype=torch.int32, device="cuda")
    for bags in bag_counts:
        n_rows = bags * POOLING_FACTOR
        index_sets = [torch.randint(0, TABLE_ROWS, (n_rows,), device="cuda") for _ in range(N_SETS)]
        offsets = torch.arange(0, n_rows + 1, POOLING_FACTOR, device="cuda")
        empty_out = torch.empty(bags, dtype=torch.int32, device="cuda")
        empty_us = graph_time_us(lambda i: _empty_kernel[(bags,)](empty_out, num_warps=1), N_SETS)
        print(f"| {bags} | empty kernel, {bags} programs | | 1 | | {empty_us:.1f} | | | |", flush=True)
        for row_bytes, has_qparams in ((64, False), (64, True), (256, False)):
            table = tables[row_bytes]
            for rows, warps, via_offsets in ((8, 1, False), (32, 1, False), (32, 4, False), (128, 4, False),
                                             (32, 1, True), (32, 4, True)):
                out = torch.empty(n_rows // rows, dtype=torch.int32, device="cuda")

                def run(i):
                    _gather_kernel[(n_rows // rows,)](table, qparams, index_sets[i], offsets, out,
                                                      ROW_WORDS=row_bytes // 4, ROWS=rows, HAS_QPARAMS=has_qparams,
                                                      VIA_OFFSETS=via_offsets, num_warps=warps)
                us = graph_time_us(run, N_SETS)
                last = index_sets[N_SETS - 1]
                expected = table[last].view(-1, rows * row_bytes // 4).sum(1, dtype=torch.int32)
                if has_qparams:
                    expected += qparams[last].view(-1, rows * 2).sum(1, dtype=torch.int32)
                assert torch.equal(out, expected), "the gather read the wrong rows"
                gbps = n_rows * (row_bytes + 8 * has_qparams) / us / 1e3
                print(f"| {bags} | {row_bytes}{' + 8' if has_qparams else ''} | {rows} | {warps} "
                      f"| {'yes' if via_offsets else 'no'} | {us:.1f} | {n_rows / us / 1e3:.2f} | {gbps:.0f} "
                      f"| {100 * gbps / copy:.0f}% |", flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [2048, 16384])
