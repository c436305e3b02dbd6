"""Row storage for embedding tables and item corpora: `quantize_rows` and `RowTable`."""

import numpy as np

from .._backend import aligned_empty, array_kind, backend_module, bf16_bits_to_float32, choose_backend, dtype_name, to_numpy, to_torch, warn_once
from .._validate import check_array, check_choice, check_finite
from . import reference

ROW_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
_FINITE_LIMIT = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}   # largest finite values
_FLOAT_TABLE_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class RowTable:
    """An (R, D) float table stored row by row as `dtype` ("fp32", "fp16", "bf16", "int8", "int4").

    data: fp32 float32 (R, D); fp16 float16 (R, D); bf16 (R, D) bfloat16 tensor, or its
    uint16 bits in NumPy; int8 uint8 codes (R, D); int4 uint8 (R, ceil(D/2)), two codes a
    byte, low nibble first. scale, bias: float32 (R,) for int8/int4, else None.
    All three are NumPy arrays, or torch tensors on one device.
    """

    __slots__ = ("dtype", "shape", "data", "scale", "bias")

    def __init__(self, dtype, shape, data, scale=None, bias=None):
        self.dtype = dtype
        self.shape = (int(shape[0]), int(shape[1]))
        self.data = data
        self.scale = scale
        self.bias = bias

    @property
    def kind(self):
        """'numpy', 'torch' (CPU tensors) or 'cuda'."""
        return array_kind(self.data)

    @property
    def device(self):
        return None if self.kind == "numpy" else self.data.device

    @property
    def nbytes(self):
        parts = (self.data, self.scale, self.bias)
        return int(sum(p.nbytes if isinstance(p, np.ndarray) else p.numel() * p.element_size()
                       for p in parts if p is not None))

    def numpy(self):
        """The same table with NumPy storage (a view for host data, a copy from a GPU)."""
        if self.kind == "numpy":
            return self
        return RowTable(self.dtype, self.shape, to_numpy(self.data),
                        None if self.scale is None else to_numpy(self.scale),
                        None if self.bias is None else to_numpy(self.bias))

    def to(self, device):
        """The same table as torch tensors on `device` ("cpu", "cuda", ...); a fused table (see
        fused()) moves as one buffer and stays fused."""
        host = self.numpy()
        if host.scale is not None and host.shape[0] > 1 and host.scale.strides[0] != 4:
            row_bytes = host.data.shape[1]
            if row_bytes % 4 == 0:
                import torch
                buffer = torch.from_numpy(_fused_buffer(host)).to(device)
                qparams = buffer[:, row_bytes:].view(torch.float32)
                return RowTable(host.dtype, host.shape, buffer[:, :row_bytes], qparams[:, 0], qparams[:, 1])
            # the scale and bias would sit at addresses a float32 load cannot take
            warn_once("fused-unaligned", f"a fused table with {row_bytes}-byte rows (not a multiple of 4) moves "
                                         "to torch as separate codes, scales and biases")
        # np.require: views into a fused buffer may be strided or unaligned, which torch refuses
        move = lambda a: None if a is None else to_torch(np.require(a, requirements="CA"), device)  # noqa: E731
        return RowTable(self.dtype, self.shape, to_torch(host.data, device, bf16=self.dtype == "bf16"),
                        move(host.scale), move(host.bias))

    def fused(self):
        """This int8/int4 table in FBGEMM's fused layout: codes, scale and bias side by side in one
        (R, row bytes + 8) host buffer, so a lookup reads one run of bytes a row (72 at D = 64)
        instead of codes and qparams from two places. data/scale/bias become strided views into it."""
        if self.scale is None:
            raise ValueError(f"fused() needs an int8 or int4 table, got {self.dtype}")
        buffer = _fused_buffer(self.numpy())
        row_bytes = buffer.shape[1] - 8
        qparams = buffer[:, row_bytes:].view(np.float32)
        return RowTable(self.dtype, self.shape, buffer[:, :row_bytes], qparams[:, 0], qparams[:, 1])

    def dequantize(self):
        """float32 (R, D), as the same kind of array as the storage."""
        host = self.numpy()
        out = reference.dequantize(self.dtype, self.shape[1], host.data, host.scale, host.bias)
        if self.kind == "numpy":
            return out
        return to_torch(out, self.device)

    def __repr__(self):
        return f"RowTable(dtype={self.dtype!r}, shape={self.shape}, nbytes={self.nbytes}, kind={self.kind!r})"


def _fused_buffer(host):
    """(R, row bytes + 8) uint8: each row's codes, then its float32 scale and bias (host table)."""
    rows, row_bytes = host.data.shape
    buffer = aligned_empty((rows, row_bytes + 8), np.uint8)
    buffer[:, :row_bytes] = host.data
    qparams = buffer[:, row_bytes:].view(np.float32)
    qparams[:, 0], qparams[:, 1] = host.scale, host.bias
    return buffer


def has_contiguous_rows(array):
    """Whether each row's elements sit side by side at a row stride >= 0, so that the kernels read the
    rows in place at any row stride (a column slice `w[:, :d]`): a 2-D NumPy array or tensor.
    A stride along a dimension of size 0 or 1 is never used, and may be anything."""
    rows, dim = array.shape[0], array.shape[1]
    if isinstance(array, np.ndarray):
        row_stride, element_stride, element = array.strides[0], array.strides[1], array.itemsize
    else:   # torch strides are never negative
        row_stride, element_stride, element = array.stride(0), array.stride(1), 1
    return rows == 0 or ((dim <= 1 or element_stride == element) and (rows == 1 or row_stride >= 0))


def as_row_table(table, name="table"):
    """A RowTable as is, or a float (R, D) array of float32/float16/bfloat16 wrapped without a copy
    when its rows are contiguous (has_contiguous_rows); any other layout (a transpose, reversed
    rows) is copied, with a warning: on every call where the array is passed to embedding_bag or
    topk, once where it builds a TableBatch."""
    if isinstance(table, RowTable):
        return table
    check_array(name, table, 2, tuple(_FLOAT_TABLE_DTYPES))
    dtype = _FLOAT_TABLE_DTYPES[dtype_name(table)]
    if not isinstance(table, np.ndarray):
        table = table.detach()
    if not has_contiguous_rows(table):
        warn_once(f"{name}-layout", f"{name}: an array whose rows are not contiguous is copied (on every call, "
                  f"if passed to embedding_bag or topk directly); pass a row-major array or a RowTable")
        table = np.ascontiguousarray(table) if isinstance(table, np.ndarray) else table.contiguous()
    return RowTable(dtype, table.shape, table)


def quantize_rows(weights, dtype):
    """Store a float (R, D) table as `dtype`: "fp32", "fp16", "bf16", "int8" or "int4".

    Returns a RowTable on the same kind of array and device as `weights`. On the host, new
    storage starts a cache line (aligned_empty); fp32 of a row-major float32 array is that array.
    """
    check_choice("dtype", dtype, ROW_DTYPES)
    kind = check_array("weights", weights, 2, ("float32", "float16", "bfloat16", "float64"))
    check_finite("weights", weights)
    backend = choose_backend(kind)
    if backend == "triton":
        warn_once("quantize_rows-host", "quantize_rows has no GPU kernel: CUDA weights are quantized on the host")
        backend = "cpu"
    host = to_numpy(weights)
    if host.dtype == np.uint16:  # bf16 bits
        host = bf16_bits_to_float32(host)
    limit = _FINITE_LIMIT.get(dtype)
    if limit is not None and host.size and float(np.abs(host).max()) > limit:
        raise ValueError(f"weights has values outside the {dtype} range (largest magnitude {limit:g})")
    data, scale, bias = backend_module(__name__, backend).quantize(host, dtype)
    table = RowTable(dtype, weights.shape, data, scale, bias)
    return table if kind == "numpy" else table.to(weights.device)
