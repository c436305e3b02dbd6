"""Similarity top-k on a CUDA device (issue 4, GPU targets): the Triton scan against
torch.topk(q @ X.T) on the same GPU and the same corpus tensor.

    python -m bench.compare gpu_topk             # needs a CUDA device

Corpus N = 1M random normal rows, d = 64, on the GPU; k = 100; 8 rotated query batches.
- B = 1 and 16: GB/s counts the corpus bytes a search must read, against the device copy
  measured in the same run (target 70%); the torch peer is there for scale.
- B = 256: ours vs torch.topk(q @ X.T) (target 1.5x), fp32 and fp16 (the peer's matmul in the
  corpus dtype, as a user would write it).
- int8 rows vs our fp16 search of the same corpus (target 2x).
"""
import numpy as np
import torch

from bench.protocol import Comparison, quantize_in_slices
from recscore.kernels import RowTable, topk

DEVICE = "cuda"
N_SETS = 8
K = 100


def comparisons(quick=False):
    n, d = (100_000 if quick else 1_000_000), 64
    corpus = {"fp32": torch.randn(n, d, device=DEVICE)}
    corpus["fp16"] = corpus["fp32"].half()
    tables = {dtype: RowTable(dtype, (n, d), x) for dtype, x in corpus.items()}
    rng = np.random.default_rng(0)
    tables["int8"] = quantize_in_slices(lambda start, stop: rng.standard_normal((stop - start, d), dtype=np.float32),
                                        n, "int8", 1 << 17).to(DEVICE)
    for B in (1, 16, 256):
        queries = [torch.randn(B, d, device=DEVICE) for _ in range(N_SETS)]
        shape = f"N={n // 1000}k d={d} B={B} k={K}"

        def ours_of(table):
            return lambda i: topk(queries[i], table, K)

        def peer_of(x):
            return lambda i: torch.topk(queries[i].to(x.dtype) @ x.T, K, dim=1)

        for dtype, elem in (("fp32", 4), ("fp16", 2)):
            yield Comparison(f"{shape} {dtype}", f"recscore triton {dtype}", f"torch.topk(q @ X.T) cuda {dtype}",
                             ours_of(tables[dtype]), peer_of(corpus[dtype]), target=1.5 if B == 256 else None,
                             bytes_per_call=n * d * elem, device=DEVICE,
                             note="" if B == 256 else "GB/s target: 70% of the device copy")
        yield Comparison(f"{shape} int8 rows", "recscore triton int8", "recscore triton fp16", ours_of(tables["int8"]),
                         ours_of(tables["fp16"]), target=2.0, bytes_per_call=n * (d + 8), device=DEVICE)
