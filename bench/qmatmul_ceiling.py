"""The measured ceiling of qmatmul at M = 128 against torch's dynamic int8 Linear (issue 15).

    flock /tmp/recscore-cpu.lock .venv/bin/python -m bench.qmatmul_ceiling

Compiles bench/ceilings/qmatmul_epilogue.c (AVX-512 VNNI; skipped with a message on a CPU without it)
and times, alternated in pairs on the same activations, 2 threads each:
  - torch quantize_dynamic int8 Linear (FBGEMM: one scale per row and per tensor);
  - the bare "blocked" kernel: only the work a format with a scale per 32 weights and per 32
    activations cannot avoid (vpdpbusd, then per block a convert, a scale product and a fused add);
  - the bare "per-tensor" kernel: vpdpbusd over all of K and one convert (torch's kind of format);
  - recscore's qmatmul on an int8 group-32 matrix of the same shape (the real code).
Prints medians of per-pair ratios (torch time / time; above 1 faster than torch). Notes: bench/notes/cpu-qmatmul.md.
"""
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

from bench.protocol import THREADS, set_threads  # noqa: I001 (first: it sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import torch

from recscore.kernels import cpu_info, qmatmul, quantize_matrix

SOURCE = Path(__file__).resolve().parent / "ceilings" / "qmatmul_epilogue.c"
SHAPES = ((128, 640, 2048), (128, 2048, 640), (128, 1024, 640), (128, 384, 1536))   # (M, K, N)
PAIRS = 40


def build():
    out = Path(tempfile.mkdtemp()) / "ceiling.so"
    subprocess.run(["cc", "-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma", "-fopenmp", "-shared", "-fPIC",
                    str(SOURCE), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.ceiling_gemm.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p,
                                                                                                   ctypes.c_int]
    return lib


def aligned(shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


def ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main():
    if "avx512_vnni" not in cpu_info()["level"]:
        print(f"this CPU's level is {cpu_info()['level']}: the ceiling kernels need AVX-512 VNNI")
        return
    set_threads(THREADS)
    lib = build()
    rng = np.random.default_rng(0)
    print(f"{cpu_info()['model']}, level {cpu_info()['level']}, {THREADS} threads; median of {PAIRS} alternated pairs, "
          "torch time / time (above 1: faster than torch int8 Linear)")
    print(f"{'M x K -> N':>18}  {'torch ms':>8}  {'bare blocked':>12}  {'bare per-tensor':>15}  {'recscore int8 g32':>17}")
    for M, K, N in SHAPES:
        w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
        x = rng.standard_normal((M, K)).astype(np.float32)
        linear = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
        int8_linear = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                             dtype=torch.qint8)
        xt = torch.from_numpy(x)
        qm = quantize_matrix(w, "int8", group_size=32)
        panels = aligned((N // 16, K // 32, 512), np.uint8)
        panels[:] = rng.integers(0, 256, panels.shape, dtype=np.uint8)
        scales = aligned((N // 16, K // 32, 16), np.float32)
        scales[:] = rng.random(scales.shape, dtype=np.float32)
        xq = aligned((M, K), np.uint8)
        xq[:] = rng.integers(0, 256, xq.shape, dtype=np.uint8)
        xd = aligned((M, K // 32), np.float32)
        xd[:] = rng.random(xd.shape, dtype=np.float32)
        out = aligned((M, N), np.float32)

        def bare(blocked):
            return lambda: lib.ceiling_gemm(blocked, panels.ctypes.data, scales.ctypes.data, xq.ctypes.data,
                                            xd.ctypes.data, M, N, K, out.ctypes.data, THREADS)

        sides = {"torch": lambda: int8_linear(xt), "blocked": bare(1), "per_tensor": bare(0),
                 "ours": lambda: qmatmul(x, qm)}
        for fn in sides.values():
            for _ in range(5):
                fn()
        times = {name: [] for name in sides}
        for _ in range(PAIRS):
            for name, fn in sides.items():
                times[name].append(ms(fn))
        torch_ms = np.array(times["torch"])
        ratio = {name: float(np.median(torch_ms / np.array(t))) for name, t in times.items()}
        print(f"{M:>5} x {K:>4} -> {N:>4}  {np.median(torch_ms):8.3f}  {ratio['blocked']:11.2f}x  "
              f"{ratio['per_tensor']:14.2f}x  {ratio['ours']:16.2f}x")


if __name__ == "__main__":
    main()
