"""Quantized matrices and matmul against them: `quantize_matrix`, `QuantizedMatrix`, `qmatmul`.

Backends get validated inputs:
  reference/cpu: matmul(x, qm) with x a C-contiguous float32 NumPy (M, in); take(qm, rows) with
                 rows int64 NumPy; both return float32 NumPy.
  triton:        matmul(x, qm) with x a float torch tensor (M, in) on a CUDA device (or the CPU
                 under TRITON_INTERPRET=1); returns float32 (M, out) on x's device.
"""
import numbers
import threading

import numpy as np

from .._backend import (backend_module, bf16_bits_to_float32, choose_backend, like, read_only_view, to_numpy,
                        to_numpy_float32, warn_once)
from .._validate import FLOAT_DTYPES, INDEX_DTYPES, check_array, check_choice, check_finite, check_shape
from . import reference

QUANT_FORMATS = ("int8", "int4")
# gguf.GGMLQuantizationType names -> our format names.
GGUF_FORMATS = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0", "Q5_0": "q5_0", "Q4_K": "q4_k", "Q6_K": "q6_k"}
MATRIX_FORMATS = QUANT_FORMATS + tuple(GGUF_FORMATS.values())
FLOAT_ELEMENT_BYTES = {"f32": 4, "f16": 2}   # the CPU kernels read these rows as floats


class QuantizedMatrix:
    """An (out, in) float matrix stored quantized, rows along `out`.

    data:   GGUF formats: uint8 (out, bytes per row), the file's blocks unchanged (a view of the
            memory-mapped file when read with gguf.GGUFReader); int8: int8 codes (out, in);
            int4: uint8 (out, in/2), see reference.py for the nibble order.
    scales: float32 (out, in/group_size) for int8/int4, else None.
    group_size: weights per block (32 or 256 for GGUF block formats, 1 for f32/f16); int8/int4:
            any that divides in (even for int4).
    data and scales are C-contiguous NumPy arrays (f32/f16 data and the scales aligned to their
    elements), checked when the matrix is made: TypeError/ValueError name the argument. Immutable:
    the attributes are fixed and the arrays are read-only views. Backends keep derived layouts
    (device copies, repacked panels) in `prepared`, built once under `lock`.
    """

    __slots__ = ("fmt", "shape", "data", "scales", "group_size", "prepared", "lock")

    def __init__(self, fmt, shape, data, scales=None, group_size=1):
        shape = check_shape("shape", shape)
        group_size = _check_storage(fmt, shape, data, scales, group_size)
        values = (fmt, shape, read_only_view(data), None if scales is None else read_only_view(scales), group_size,
                  {}, threading.Lock())
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"QuantizedMatrix is immutable: make a new one instead of setting {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"QuantizedMatrix is immutable: {name!r} cannot be deleted")

    def __reduce__(self):   # copy and pickle through __init__ (derived layouts are rebuilt)
        return QuantizedMatrix, (self.fmt, self.shape, self.data, self.scales, self.group_size)

    @classmethod
    def from_gguf(cls, tensor):
        """A gguf.ReaderTensor of type F32, F16, Q8_0, Q5_0, Q4_K or Q6_K, without copying its bytes.

        in_features is the tensor's row length ne[0]; the other dimensions are flattened into
        out_features (a 1-D tensor is one row).
        """
        type_name = getattr(getattr(tensor, "tensor_type", None), "name", None)
        if type_name is None or not hasattr(tensor, "data"):
            raise TypeError(f"tensor must be a gguf.ReaderTensor, got {type(tensor).__name__}")
        if type_name not in GGUF_FORMATS:
            raise ValueError(f"tensor {tensor.name!r} has GGUF type {type_name}; supported: {tuple(GGUF_FORMATS)}")
        fmt = GGUF_FORMATS[type_name]
        ne = [int(n) for n in tensor.shape]
        in_features = ne[0]
        out_features = int(np.prod(ne[1:], dtype=np.int64))
        weights_per_block, block_bytes = reference.GGUF_BLOCKS[fmt]
        if in_features % weights_per_block:
            raise ValueError(f"tensor {tensor.name!r}: row length {in_features} is not a multiple of the "
                             f"{type_name} block ({weights_per_block})")
        raw = np.asarray(tensor.data).view(np.uint8)   # drops the memmap subclass, keeps the bytes
        row_bytes = in_features // weights_per_block * block_bytes
        if raw.size != out_features * row_bytes:
            raise ValueError(f"tensor {tensor.name!r}: {raw.size} bytes, expected {out_features * row_bytes}")
        return cls(fmt, (out_features, in_features), raw.reshape(out_features, row_bytes),
                   group_size=weights_per_block)

    @property
    def nbytes(self):
        return int(self.data.nbytes + (0 if self.scales is None else self.scales.nbytes))

    def dequantize(self):
        """float32 (out, in) NumPy; for GGUF formats equal to gguf.quants.dequantize."""
        return _cpu_module("take")(self, None)

    def take(self, rows):
        """float32 (len(rows), in): the selected rows dequantized (an embedding lookup).

        rows: 1-D int32/int64 (NumPy or tensor); the result is the same kind of array.
        """
        kind = check_array("rows", rows, 1, INDEX_DTYPES)
        host = np.ascontiguousarray(to_numpy(rows)).astype(np.int64, copy=False)
        if host.size and (host.min() < 0 or host.max() >= self.shape[0]):
            bad = int(np.flatnonzero((host < 0) | (host >= self.shape[0]))[0])
            raise IndexError(f"rows[{bad}] = {int(host[bad])} is out of range for a matrix of {self.shape[0]} rows")
        out = _cpu_module("take")(self, host)
        return like(out, kind, rows.device if kind == "cuda" else None)

    def __repr__(self):
        return f"QuantizedMatrix(fmt={self.fmt!r}, shape={self.shape}, nbytes={self.nbytes})"


def _check_storage(fmt, shape, data, scales, group_size):
    """The group size as an int; TypeError/ValueError unless data and scales hold an (out, in) = `shape`
    matrix in `fmt`."""
    check_choice("fmt", fmt, MATRIX_FORMATS)
    group_size = _checked_group_size(fmt, group_size)
    out_features, in_features = shape
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data must be a NumPy array (a QuantizedMatrix lives on the host), got {type(data).__name__}")
    check_array("data", data, 2, ("int8",) if fmt == "int8" else ("uint8",))
    if fmt in QUANT_FORMATS:
        if in_features % group_size:
            raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")
        row_width = in_features // 2 if fmt == "int4" else in_features
    else:
        weights_per_block, block_bytes = reference.GGUF_BLOCKS[fmt]
        if group_size != weights_per_block:
            raise ValueError(f"group_size of a {fmt} matrix must be its block's {weights_per_block} weights, "
                             f"got {group_size}")
        if in_features % weights_per_block:
            raise ValueError(f"in_features ({in_features}) must be a multiple of the {fmt} block "
                             f"({weights_per_block} weights)")
        row_width = in_features // weights_per_block * block_bytes
    if tuple(data.shape) != (out_features, row_width):
        raise ValueError(f"data has shape {tuple(data.shape)}, but a matrix of shape {shape} stored as {fmt} "
                         f"needs data of shape {(out_features, row_width)}")
    if not data.flags.c_contiguous:
        raise ValueError("data must be C-contiguous (the kernels read whole rows at a fixed stride): pass "
                         "np.ascontiguousarray(data)")
    element = FLOAT_ELEMENT_BYTES.get(fmt, 1)
    if data.size and data.ctypes.data % element:
        raise ValueError(f"data of a {fmt} matrix must start at a multiple of {element} bytes: pass a copy")
    if fmt not in QUANT_FORMATS:
        if scales is not None:
            raise ValueError(f"a {fmt} matrix keeps its scales inside its blocks: scales must be None")
        return group_size
    if scales is None:
        raise ValueError(f"a matrix stored as {fmt} needs float32 scales of shape "
                         f"{(out_features, in_features // group_size)}")
    if not isinstance(scales, np.ndarray):
        raise TypeError(f"scales must be a NumPy array, got {type(scales).__name__}")
    check_array("scales", scales, 2, ("float32",))
    if tuple(scales.shape) != (out_features, in_features // group_size):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, but {shape} in groups of {group_size} needs "
                         f"{(out_features, in_features // group_size)}")
    if not (scales.flags.c_contiguous and scales.flags.aligned):
        raise ValueError("scales must be C-contiguous and aligned to 4 bytes: pass np.array(scales, order='C')")
    return group_size


def _checked_group_size(fmt, group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if fmt == "int4" and group_size % 2:
        raise ValueError(f"group_size must be even for int4 (two codes a byte), got {group_size}")
    return int(group_size)


def _cpu_module(op):
    """take/dequantize run on the host: the forced backend if it is a host one, else cpu."""
    backend = choose_backend("numpy")
    return getattr(backend_module(__name__, "reference" if backend == "reference" else "cpu"), op)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def quantize_matrix(weight, fmt, *, group_size=32):
    """Store a float (out, in) matrix as group-wise symmetric "int8" or "int4" (see reference.py)."""
    check_choice("fmt", fmt, QUANT_FORMATS)
    check_array("weight", weight, 2, FLOAT_DTYPES)
    group_size = _checked_group_size(fmt, group_size)
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"weight has {in_features} columns (in_features), not a multiple of group_size={group_size}")
    check_finite("weight", weight)
    host = to_numpy(weight)
    if host.dtype == np.uint16:  # bf16 bits
        host = bf16_bits_to_float32(host)
    if host.size and float(np.abs(host).max()) > FLOAT32_MAX:   # float64 past float32: scales would be inf
        raise ValueError(f"weight has values outside the float32 range (largest magnitude {FLOAT32_MAX:g})")
    codes, scales = reference.quantize(host, fmt, group_size)
    return QuantizedMatrix(fmt, weight.shape, codes, scales, group_size)


def qmatmul(x, qm):
    """x float (M, in) -> float32 (M, out) = x @ W.T, accumulated in float32, as x's kind of array.

    Accuracy on the cpu backend (the rule is cpu.uses_vnni): for q8_0, q5_0, q4_k, q6_k, int8 and
    int4 on an AVX-512 VNNI CPU, x is quantized to int8 per block (32 values for the GGUF formats, as
    llama.cpp does; the weight group for int8 and int4) and
    |y - x @ W.T| <= (1.01 / 254 + 2e-5) * (xmax @ |W|.T), xmax = each |x| replaced by the max |x|
    of its block (q4_k: |W| + its mins term); about 5e-3 relative L2 error on Gaussian x.
    Otherwise x stays float32: |error| <= 5e-5 * (|x| @ |W|.T).
    """
    if not isinstance(qm, QuantizedMatrix):
        raise TypeError(f"qm must be a QuantizedMatrix, got {type(qm).__name__}")
    kind = check_array("x", x, 2, FLOAT_DTYPES)
    if x.shape[1] != qm.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but the matrix {qm!r} has in_features {qm.shape[1]}: "
                         f"x must be (M, {qm.shape[1]})")
    check_finite("x", x)
    device = x.device if kind == "cuda" else None
    backend = choose_backend(kind)
    if backend == "triton" and kind == "numpy":
        raise ValueError("the triton backend takes torch tensors (CPU tensors under TRITON_INTERPRET=1), got "
                         "a NumPy x")
    if backend == "triton":
        triton_backend = backend_module(__name__, "triton")
        if qm.fmt in triton_backend.FORMATS:
            return triton_backend.matmul(x.detach().contiguous(), qm)
        warn_once(f"qmatmul-triton-{qm.fmt}", f"qmatmul has no Triton kernel for {qm.fmt}: it runs on the CPU kernels")
        backend = "cpu"
    out = backend_module(__name__, backend).matmul(to_numpy_float32(x), qm)
    return like(out, kind, device)
