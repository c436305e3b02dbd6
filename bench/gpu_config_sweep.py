"""Time the embedding lookup kernel at fixed tile configurations (no autotuner) on a CUDA device:
fp32, int8 and FBGEMM-layout ("int8 fused") rows of a 2M x 64 table, B = 2048 and 16384, L = 32,
each time the median of 20 replays of a CUDA graph of 8 calls over rotated index sets.

    python -m bench.gpu_config_sweep        # needs a CUDA device; prints a markdown table
"""
import numpy as np
import torch
import triton

from bench.protocol import graph_time_us, quantize_in_slices
from recscore.kernels import RowTable, TableBatch
from recscore.kernels.embedding_bag import triton as lookup_triton

DIM, POOLING_FACTOR, N_SETS = 64, 32, 8
CONFIGS = [(8, 64, 1), (16, 64, 1), (32, 64, 1), (32, 32, 1), (16, 64, 2), (32, 64, 4), (32, 64, 2), (32, 32, 2), (64, 64, 2),
           (64, 64, 4)]  # BLOCK_L, BLOCK_D, warps


def tables(rows):
    rng = np.random.default_rng(0)
    int8 = quantize_in_slices(lambda start, stop: rng.standard_normal((stop - start, DIM), dtype=np.float32), rows,
                              "int8", 1 << 18)
    return {"fp32": RowTable("fp32", (rows, DIM), torch.randn(rows, DIM, device="cuda")),
            "int8": int8.to("cuda"), "int8 fused": int8.fused().to("cuda")}


def main():
    rows = (2_000_000 >> 18) << 18
    stored = tables(rows)
    print("| B | rows | BLOCK_L | BLOCK_D | warps | registers | us per call |\n|---:|---|---:|---:|---:|---:|---:|")
    for B in (2048, 16384):
        index_sets = [torch.randint(0, rows, (B * POOLING_FACTOR,), device="cuda") for _ in range(N_SETS)]
        offsets = torch.arange(0, B * POOLING_FACTOR + 1, POOLING_FACTOR, device="cuda")
        for name, table in stored.items():
            meta, base, total_dim, flags, max_dim, row_align, dim_multiple, _ = lookup_triton._prepare(TableBatch([table]))
            out = torch.empty((B, DIM), device="cuda")
            errors = torch.zeros(3, dtype=torch.int32, device="cuda")
            for block_l, block_d, warps in CONFIGS:
                def run(i):
                    return lookup_triton._lookup_kernel.fn[(B, triton.cdiv(DIM, block_d))](
                        base, meta, index_sets[i], offsets, out, out, errors, B, total_dim, index_sets[i].shape[0], B,
                        max_dim, flags, 0, False, row_align, dim_multiple, BLOCK_L=block_l, BLOCK_D=block_d,
                        num_warps=warps)
                registers = run(0).n_regs
                print(f"| {B} | {name} | {block_l} | {block_d} | {warps} | {registers} | {graph_time_us(run, N_SETS):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
