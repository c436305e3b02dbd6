"""Row storage shared by the lookups and top-k: `RowTable`, the (R, D) table a kernel reads row by
row, and the row-layout helpers both use.

A RowTable is checked when it is made (the CPU kernels take R and D from `shape` and read the
storage at raw addresses, so a shape the storage does not hold would read past it) and cannot be
changed afterwards: its attributes are fixed, and NumPy storage it owns (quantize_rows, fused())
is read-only. A caller's arrays are read in place and stay the caller's: rows written into them
are seen by the next call.
"""
import numpy as np

from ._backend import aligned_empty, array_kind, dtype_name, read_only_view, to_numpy, to_torch, warn_once
from ._validate import check_array, check_shape

ROW_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
QUANTIZED_DTYPES = ("int8", "int4")
FLOAT_TABLE_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# The element type of `data` for each row dtype: (in NumPy, in torch). NumPy has no bfloat16.
STORAGE_DTYPES = {"fp32": ("float32", "float32"), "fp16": ("float16", "float16"), "bf16": ("uint16", "bfloat16"),
                  "int8": ("uint8", "uint8"), "int4": ("uint8", "uint8")}
QPARAMS_BYTES = 8   # a fused row's float32 scale and bias, after its codes


def stored_row_width(dtype, dim):
    """Elements of `data` a row of D values takes: D, or ceil(D/2) bytes for int4."""
    return (dim + 1) // 2 if dtype == "int4" else dim


class RowTable:
    """An (R, D) float table stored row by row as `dtype` ("fp32", "fp16", "bf16", "int8", "int4").

    data: fp32 float32 (R, D); fp16 float16 (R, D); bf16 (R, D) bfloat16 tensor, or its
    uint16 bits in NumPy; int8 uint8 codes (R, D); int4 uint8 (R, ceil(D/2)), two codes a
    byte, low nibble first. scale, bias: float32 (R,) for int8/int4, else None.
    All three are NumPy arrays, or torch tensors on one device. Each row's elements sit side by
    side (any row stride); NumPy storage is aligned to its elements, except scale and bias read
    in place from fused rows (see fused()). Bad storage raises TypeError or ValueError naming
    the argument. Immutable: make a new RowTable rather than setting an attribute.
    """

    __slots__ = ("dtype", "shape", "data", "scale", "bias")

    def __init__(self, dtype, shape, data, scale=None, bias=None):
        shape = check_shape("shape", shape)
        check_storage(dtype, shape, data, scale, bias)
        self._set(dtype, shape, data, scale, bias)

    @classmethod
    def _of_checked(cls, dtype, shape, data, scale=None, bias=None):
        """A table of storage that already passed check_storage's conditions (a view of a checked
        table, an array as_row_table checked): no second check on a per-call path."""
        table = object.__new__(cls)
        table._set(dtype, shape, data, scale, bias)
        return table

    def _set(self, dtype, shape, data, scale, bias):
        set_slot = object.__setattr__   # past __setattr__, which refuses every change
        set_slot(self, "dtype", dtype)
        set_slot(self, "shape", shape)
        set_slot(self, "data", data)
        set_slot(self, "scale", scale)
        set_slot(self, "bias", bias)

    def __setattr__(self, name, value):
        raise AttributeError(f"RowTable is immutable: make a new RowTable instead of setting {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"RowTable is immutable: {name!r} cannot be deleted")

    def __reduce__(self):   # copy and pickle through __init__ (the default sets the slots one by one)
        return RowTable, (self.dtype, self.shape, self.data, self.scale, self.bias)

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
        return RowTable._of_checked(self.dtype, self.shape, to_numpy(self.data),
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
        buffer = read_only_view(_fused_buffer(self.numpy()))
        row_bytes = buffer.shape[1] - QPARAMS_BYTES
        qparams = buffer[:, row_bytes:].view(np.float32)
        return RowTable(self.dtype, self.shape, buffer[:, :row_bytes], qparams[:, 0], qparams[:, 1])

    def dequantize(self):
        """float32 (R, D), as the same kind of array as the storage."""
        from .quantize_rows import reference   # that package imports this module
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
    buffer = aligned_empty((rows, row_bytes + QPARAMS_BYTES), np.uint8)
    buffer[:, :row_bytes] = host.data
    qparams = buffer[:, row_bytes:].view(np.float32)
    qparams[:, 0], qparams[:, 1] = host.scale, host.bias
    return buffer


def _strides_in_elements(array):
    """The strides of an array or tensor in elements (None for a NumPy stride that is not a whole number)."""
    if isinstance(array, np.ndarray):
        size = array.itemsize
        return tuple(s // size if s % size == 0 else None for s in array.strides)
    return tuple(array.stride())


def has_row_elements_side_by_side(array):
    """Whether each row of a 2-D array or tensor holds its elements at consecutive addresses
    (a column stride of one element; any row stride)."""
    if array.shape[1] <= 1 or array.shape[0] == 0:
        return True
    return array.strides[1] == array.itemsize if isinstance(array, np.ndarray) else array.stride(1) == 1


def has_contiguous_rows(array):
    """Whether each row's elements sit side by side at a row stride >= 0, so that the kernels read the
    rows in place at any row stride (a column slice `w[:, :d]`): a 2-D NumPy array or tensor.
    A stride along a dimension of size 0 or 1 is never used, and may be anything."""
    rows = array.shape[0]
    row_stride = array.strides[0] if isinstance(array, np.ndarray) else array.stride(0)   # torch: never negative
    return rows == 0 or (has_row_elements_side_by_side(array) and (rows == 1 or row_stride >= 0))


def _check_kind(name, array, kind, device):
    """`array` (scale or bias) is the same kind of array as `data`, on its device."""
    try:
        array_kind(array)
    except TypeError:
        raise TypeError(f"{name} must be a NumPy array or a torch.Tensor, got {type(array).__name__}") from None
    if (kind == "numpy") != isinstance(array, np.ndarray) or (kind != "numpy" and array.device != device):
        where = "the host" if isinstance(array, np.ndarray) else str(array.device)
        raise ValueError(f"{name} is on {where} but data is on {device or 'the host'}: a RowTable's arrays "
                         f"are all NumPy arrays or all tensors on one device")


def _fused_qparams(scale, bias):
    """Whether NumPy scale and bias are the side-by-side float32 pair of fused rows (bias 4 bytes
    after scale, one stride): the kernels read those bytes as they lie, or copy them."""
    return scale.strides == bias.strides and bias.ctypes.data == scale.ctypes.data + 4


def check_storage(dtype, shape, data, scale, bias):
    """Raise TypeError/ValueError unless data, scale and bias hold a `dtype` table of `shape` (R, D)."""
    if dtype not in ROW_DTYPES:
        raise ValueError(f"dtype must be one of {ROW_DTYPES}, got {dtype!r}")
    rows, dim = shape
    try:
        kind = array_kind(data)
    except TypeError:
        raise TypeError(f"data must be a NumPy array or a torch.Tensor, got {type(data).__name__}") from None
    element = STORAGE_DTYPES[dtype][kind != "numpy"]
    if dtype_name(data) != element:
        raise TypeError(f"data of a {dtype} table must be {element}, got {dtype_name(data)}")
    check_array("data", data, 2, (element,))
    stored = (rows, stored_row_width(dtype, dim))
    if tuple(data.shape) != stored:
        raise ValueError(f"data has shape {tuple(data.shape)}, but a table of shape {(rows, dim)} stored as "
                         f"{dtype} needs data of shape {stored}")
    if not has_row_elements_side_by_side(data):
        raise ValueError(f"data must hold each row's elements side by side (column stride of one element), got "
                         f"strides {_strides_in_elements(data)} in elements: pass a row-major array")
    if kind == "numpy" and not data.flags.aligned:
        raise ValueError(f"data is not aligned to its {data.itemsize}-byte elements: pass a copy (np.array(data))")
    if dtype not in QUANTIZED_DTYPES:
        if scale is not None or bias is not None:
            raise ValueError(f"a {dtype} table has no scale or bias, got "
                             f"{'scale' if scale is not None else 'bias'}")
        return
    device = None if kind == "numpy" else data.device
    for name, qparam in (("scale", scale), ("bias", bias)):
        if qparam is None:
            raise ValueError(f"a {dtype} table needs float32 scale and bias of shape ({rows},), got no {name}")
        _check_kind(name, qparam, kind, device)
        check_array(name, qparam, 1, ("float32",))
        if qparam.shape[0] != rows:
            raise ValueError(f"{name} must have one entry a row ({rows}), got {qparam.shape[0]}")
    if kind == "numpy" and not (scale.flags.aligned and bias.flags.aligned) and not _fused_qparams(scale, bias):
        raise ValueError("scale and bias must be aligned to their 4-byte elements, or be the side-by-side pair "
                         "of fused rows (RowTable.fused())")


def as_row_table(table, name="table"):
    """A RowTable (tensor storage checked again: `tensor.data = ...` may have changed it), or a float
    (R, D) array of float32/float16/bfloat16 wrapped without a copy when its rows are contiguous
    (has_contiguous_rows) and aligned; any other layout (a transpose, reversed rows) is copied,
    with a warning: on every call where the array is passed to embedding_bag or topk, once where
    it builds a TableBatch."""
    if isinstance(table, RowTable):
        if table.kind != "numpy":
            check_storage(table.dtype, table.shape, table.data, table.scale, table.bias)
        return table
    check_array(name, table, 2, tuple(FLOAT_TABLE_DTYPES))
    dtype = FLOAT_TABLE_DTYPES[dtype_name(table)]
    if not isinstance(table, np.ndarray):
        table = table.detach()
    if not has_contiguous_rows(table) or (isinstance(table, np.ndarray) and not table.flags.aligned):
        warn_once(f"{name}-layout", f"{name}: an array whose rows are not contiguous is copied (on every call, "
                  f"if passed to embedding_bag or topk directly); pass a row-major array or a RowTable")
        table = np.array(table, order="C") if isinstance(table, np.ndarray) else table.contiguous()
    return RowTable._of_checked(dtype, tuple(table.shape), table)   # check_array and the layout test above
